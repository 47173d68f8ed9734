"""Build the CT figures of PMC-VQA as closed (multiple choice) and open questions (JSONL + dataset card).

Usage:

    python datasets_scripts/build_pmc_vqa.py --data_root ROOT --output_dir build/pmc_vqa_ct            # v2 CSVs
    python datasets_scripts/build_pmc_vqa.py --data_root ROOT --output_dir OUT --version v1 --mode closed
    python datasets_scripts/build_pmc_vqa.py --data_root ROOT --output_dir OUT --convert_images --num_proc 8

Then:

    from datasets import load_dataset
    ds = load_dataset("build/pmc_vqa_ct")      # train / validation / test

The same program as the console command ``med3dqwen-build-pmc-vqa`` (installed with the package): ``--help`` prints
every option, the expected input and the output layout (:mod:`med3dqwen.scripts.build_pmc_vqa`).
"""

from med3dqwen.scripts.build_pmc_vqa import cli


if __name__ == "__main__":
    cli()
