"""Parameter counts per backbone, Hi LoRA mode and stage (all / trainable), random weights.

    python benchmarks/param_counts.py [--model ViT-B/16 ViT-L/14]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.flags import add_model_args  # noqa: E402
from models.hivg import build_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-B/16", "ViT-L/14"])
    opts = parser.parse_args()
    print("| model | mode | stage | all params | trainable |")
    print("|---|---|---|---|---|")
    for name in opts.models:
        for mode in ("paper", "official"):
            for stage in range(4):
                args = add_model_args(argparse.ArgumentParser()).parse_args(
                    ["--model", name, "--hi_lora_stage", str(stage), "--hi_lora_mode", mode,
                     "--use_contrastive_loss", "--use_rtcc_constrain_loss", "--use_mask_loss"])
                model = build_model(args)
                total = sum(p.numel() for p in model.parameters())
                train = sum(p.numel() for p in model.parameters() if p.requires_grad)
                print(f"| {name} | {mode} | {stage} | {total:,} | {train:,} |", flush=True)
                del model


if __name__ == "__main__":
    main()
