"""Build CT-RATE report generation (one whole-volume report question per scan; JSONL + dataset card).

Usage:

    python datasets_scripts/build_ctrate_reports.py --data_root ROOT --output_dir build/ctrate_reports
    python datasets_scripts/build_ctrate_reports.py --data_root ROOT --output_dir OUT --num_proc 16 \\
        --report_sections findings
    python datasets_scripts/build_ctrate_reports.py --data_root ROOT --output_dir OUT --convert_volumes   # HU copies

    # a cluster job array: every task builds one shard, then one merge with the same arguments
    python datasets_scripts/build_ctrate_reports.py --data_root ROOT --output_dir OUT --num_shards 32 --shard_index $I
    python datasets_scripts/build_ctrate_reports.py --data_root ROOT --output_dir OUT --num_shards 32 --merge_only

Then:

    from datasets import load_dataset
    ds = load_dataset("build/ctrate_reports")      # train / validation / test

The same program as the console command ``med3dqwen-build-ctrate-reports`` (installed with the package): ``--help``
prints every option, the expected input and the output layout (:mod:`med3dqwen.scripts.build_ctrate_reports`).
"""

from med3dqwen.scripts.build_ctrate_reports import cli


if __name__ == "__main__":
    cli()
