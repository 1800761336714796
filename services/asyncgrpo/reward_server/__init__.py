"""`asyncgrpo reward-server`: an HF sequence-classification reward model (ORM) served over HTTP in SGLang's shape
(`POST /classify`, as `sglang.launch_server --is-embedding` serves reward models), so a real SGLang reward server
can stand in for it. Requests from many clients are scored together in batches."""
