"""Survey of "pretrained" bases for the outcome tests' margins (not a test).

    ATEN_CPU_CAPABILITY=avx2 python tests/base_survey.py OUT SEED

Trains the base of peft_base.py with ``--seed SEED`` on one thread (as the
tests run), then the outcome tests' own runs on the novel colours, and prints
one JSON line: base top-1, zero-shot, LP-FT, DoRA, Tip-Adapter at 4 and 16 shots,
prompt tuning with defaults and with 16 random context vectors (3 seeds).
Run it for several seeds and kernel paths before changing a margin that
rests on the base (peft_base.wanted).
"""
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]

from click.testing import CliRunner  # noqa: E402
from peft_base import BASE_CONFIG, NOVEL_DATA  # noqa: E402
from shapes_folder import write_folder  # noqa: E402
from test_prompt import PROMPT_DATA, SEEDS  # noqa: E402
from test_tip_adapter import NOVEL, SHAPES  # noqa: E402

from clipft.cli import cli  # noqa: E402


def main(out: Path, seed: str) -> dict:
    torch.set_num_threads(1)
    runner = CliRunner()

    def run(*args):
        r = runner.invoke(cli, [str(a) for a in args] + ["--callback", "none", "--json", "--overwrite"],
                          catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    base = run("run", "--config", BASE_CONFIG, "--seed", seed, "--out", out / "base")
    r = runner.invoke(cli, ["export", str(out / "base"), str(out / "export"), "--overwrite"])
    assert r.exit_code == 0, r.output
    weights = out / "export" / "open_clip_model.safetensors"
    res = {"seed": seed, "base_top1": base["eval"]["after"]["top1"]}
    s = run("run", "--model", "tiny-vit", "--pretrained", weights, "--data", NOVEL_DATA,
            "--strategy", "lp-ft:probe_epochs=1,then=last-n:n=2,probe_lr=1e-2", "--lr", "1e-3",
            "--head", "zero-shot", "--epochs", "2", "--batch-size", "32", "--out", out / "lpft")
    res["zero_shot"], res["lp_ft"] = s["eval"]["before"]["top1"], s["eval"]["after"]["head_top1"]
    s = run("run", "--model", "tiny-vit", "--pretrained", weights, "--data", NOVEL_DATA,
            "--strategy", "lora:dora=true", "--lr", "1e-2", "--epochs", "2", "--batch-size", "32", "--out", out / "dora")
    res["dora"] = s["eval"]["after"]["top1"]
    folder = out / "novel"
    write_folder(folder / "train", 24, NOVEL, SHAPES, seed=0)
    write_folder(folder / "val", 16, NOVEL, SHAPES, seed=1)
    for k in (4, 16):
        s = run("run", "--model", "tiny-vit", "--pretrained", weights, "--head", "tip-adapter",
                "--data", f"imagefolder:root={folder},shots={k}", "--batch-size", "32", "--epochs", "0",
                "--out", out / f"tip{k}")
        res["tip_zero_shot"], res[f"tip_{k}"] = s["eval"]["after"]["top1"], s["eval"]["after"]["head_top1"]

    def tune(tag, strategy, run_seed, *args):
        return run("run", "--model", "tiny-vit", "--pretrained", weights, "--data", PROMPT_DATA,
                   "--strategy", strategy, "--head", "text", "--batch-size", "32", "--seed", run_seed,
                   *args, "--out", out / tag)
    s = tune("prompt", "prompt", 0, "--epochs", "3")
    losses = [h["train_loss"] for h in s["eval"]["history"][1:]]
    res["prompt_defaults"] = s["eval"]["after"]["top1"]
    res["prompt_loss_falls"] = losses[-1] < losses[0]
    res["prompt_random16"] = [tune(f"random16-{k}", "prompt:init=none", k, "--epochs", "10", "--lr", "5e-3")
                              ["eval"]["after"]["top1"] for k in SEEDS]
    return res


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2])))
