"""What every service needs to talk to a generation server (SGLang or genserver): the async HTTP
client, the torch.distributed group helper and the flattened-bucket pack/unpack used by weight sync."""
