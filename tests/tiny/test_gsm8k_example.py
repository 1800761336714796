"""examples/gsm8k_qwen2.5.yaml (a GPU config, never run in CI): it loads, its prompt is Qwen2.5's chat template
around verl's GSM8K instruction, the gsm8k reward scores a GSM8K record's own solution 1, and `up --dry-run`
plans four SGLang servers on GPUs 4-7 beside a four-GPU trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from asyncgrpo.config import load_config
from asyncgrpo.rewards import REWARD_FNS, RewardInput
from asyncgrpo.rollout.dataset import PromptDataset

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gsm8k_qwen2.5.yaml"
# GSM8K's first training record (openai/gsm8k, main)
RECORD = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                      "How many clips did Natalia sell altogether in April and May?",
          "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                    "altogether in April and May.\n#### 72"}


def test_prompt_is_qwen_chatml_and_the_reward_reads_gsm8k_answers(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    cfg = load_config([str(EXAMPLE)], [])
    ds = PromptDataset([RECORD], lambda t: [], template=cfg.train_dataset.prompt_template,
                       prompt_key=cfg.train_dataset.prompt_key, answer_key=cfg.train_dataset.answer_key, shuffle=False)
    prompt = ds.render(0)
    # what Qwen2.5's own chat template renders (the tiny tokenizer carries the same ChatML template, without
    # the default system line, which is therefore given here)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "system", "content": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."},
                {"role": "user", "content": RECORD["question"] + ' Let\'s think step by step and output the final answer after "####".'}]
    assert prompt == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    fn = REWARD_FNS[cfg.reward.fns[0]]
    assert fn(RewardInput(prompt, "She sold 24 in May, so 48+24=72.\n#### 72", RECORD[cfg.train_dataset.answer_key])) == 1.0
    assert fn(RewardInput(prompt, "#### 71", RECORD["answer"])) == 0.0
    assert cfg.trainer.dtype == "bfloat16" and cfg.launch.engine == "sglang"


def test_dry_run_plans_the_gpus(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(RECORD) + "\n" for _ in range(300)))
    out = subprocess.run([sys.executable, "-m", "asyncgrpo.cli", "up", "--config", str(EXAMPLE), "--steps", "2",
                          f"--actor.path={tiny_model_dir}", f"--train_dataset.path={data}",
                          f"--evaluator.data_path={data}", "--run-dir", str(tmp_path / "run"), "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert [n for n in lines if n.startswith("sglang")] == ["sglang0", "sglang1", "sglang2", "sglang3"]
    assert "CUDA_VISIBLE_DEVICES=7 " in lines["sglang3"] and "sglang.launch_server" in lines["sglang3"]
    assert "--mem-fraction-static 0.8" in lines["sglang0"]
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3 " in lines["trainer"] and "--nproc-per-node=4" in lines["trainer"]
    assert not (tmp_path / "run").exists()
