"""The trainer side of a weight update, run as its own process by test_weights.py: rank 0 of a gloo group
with one genserver, broadcasting an HF checkpoint's tensors the way the weight-sync service does.

python -m tests.genserver.trainer_side URL PORT GROUP CKPT MODE  (MODE: update | bad_shape | nan | die)
Prints one JSON line with what happened.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import torch
import torch.distributed as dist

from asyncgrpo.genserver.weights import load_safetensors_dir
from asyncgrpo.sglang.buckets import pack_bucket
from asyncgrpo.sglang.client import SGLangClient, SGLangError
from asyncgrpo.sglang.dist_group import destroy_custom_process_group, init_custom_process_group


async def main(url: str, port: int, group: str, ckpt: str, mode: str) -> dict:
    torch.set_num_threads(1)
    tensors = load_safetensors_dir(ckpt)
    names = sorted(tensors)
    half = len(names) // 2
    out: dict = {}
    async with SGLangClient(url, timeout_s=60) as c:
        join = asyncio.create_task(c.init_weights_update_group("127.0.0.1", port, 1, 2, group, "gloo"))
        pg = await asyncio.to_thread(init_custom_process_group, "gloo", master_address="127.0.0.1", master_port=port,
                                     world_size=2, rank=0, group_name=group, timeout=30)
        await join
        await c.begin_weight_update()
        if mode == "update":
            # per tensor, fp32, no version yet
            first = names[:half]
            req = asyncio.create_task(c.update_weights_from_distributed(
                first, [tensors[n].dtype for n in first], [list(tensors[n].shape) for n in first], group))
            for n in first:
                await asyncio.to_thread(dist.broadcast, tensors[n].contiguous(), 0, pg)
            out["per_tensor"] = await req
            out["version_after_first"] = (await c.model_info())["weight_version"]
            # the rest as one flattened bfloat16 bucket, with the new version
            rest = names[half:]
            bf = [tensors[n].to(torch.bfloat16) for n in rest]
            req = asyncio.create_task(c.update_weights_from_distributed(
                rest, [t.dtype for t in bf], [list(t.shape) for t in bf], group, weight_version="v2",
                load_format="flattened_bucket"))
            await asyncio.to_thread(dist.broadcast, pack_bucket(bf), 0, pg)
            out["bucket"] = await req
            await c.end_weight_update()
            await c.destroy_weights_update_group(group)
            destroy_custom_process_group(pg)
            del pg  # free it now: a group freed at interpreter exit can abort the process
        elif mode == "bad_shape":
            name = names[0]
            wrong = torch.zeros(3, 3)
            req = asyncio.create_task(c.update_weights_from_distributed([name], ["float32"], [[3, 3]], group,
                                                                        weight_version="bad"))
            await asyncio.to_thread(dist.broadcast, wrong, 0, pg)
            try:
                await req
                out["error"] = None
            except SGLangError as e:
                out["error"] = str(e)
            await c.end_weight_update()
            await c.destroy_weights_update_group(group)
            destroy_custom_process_group(pg)
            del pg  # free it now: a group freed at interpreter exit can abort the process
        elif mode == "nan":
            # a good bucket, then one with an inf through the same (reused) receive buffer: rejected whole
            two = names[:2]
            good = [tensors[n].contiguous() for n in two]
            bad = [good[0] + 1, good[1].clone()]
            bad[1].view(-1)[-1] = float("inf")
            for key, ts, version in (("good", good, "finite"), ("bad", bad, "inf")):
                req = asyncio.create_task(c.update_weights_from_distributed(
                    two, [t.dtype for t in ts], [list(t.shape) for t in ts], group, weight_version=version,
                    load_format="flattened_bucket"))
                await asyncio.to_thread(dist.broadcast, pack_bucket(ts), 0, pg)
                try:
                    out[key] = await req
                except SGLangError as e:
                    out[key] = {"error": str(e)}
            await c.end_weight_update()
            await c.destroy_weights_update_group(group)
            destroy_custom_process_group(pg)
            del pg  # free it now: a group freed at interpreter exit can abort the process
        elif mode == "die":
            # announce an update, then die before broadcasting anything
            asyncio.create_task(c.update_weights_from_distributed(
                names, [tensors[n].dtype for n in names], [list(tensors[n].shape) for n in names], group,
                weight_version="never"))
            await asyncio.sleep(1.0)
            print(json.dumps({"died": True}), flush=True)
            os._exit(0)
    return out


if __name__ == "__main__":
    url, port, group, ckpt, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    print(json.dumps(asyncio.run(main(url, port, group, ckpt, mode))), flush=True)
