"""Build RadGenome-ChestCT grounded VQA for boundary prompting (JSONL + dataset card; volumes stay where they are).

Usage:

    python datasets_scripts/build_radgenome.py --data_root ROOT --output_dir build/radgenome_red --prompt red
    python datasets_scripts/build_radgenome.py --data_root ROOT --output_dir build/radgenome_none --prompt none
    python datasets_scripts/build_radgenome.py --data_root ROOT --output_dir OUT --num_proc 16 --write_png montage

    # a cluster job array: every task builds one shard, then one merge with the same arguments
    python datasets_scripts/build_radgenome.py --data_root ROOT --output_dir OUT --num_shards 32 --shard_index $I
    python datasets_scripts/build_radgenome.py --data_root ROOT --output_dir OUT --num_shards 32 --merge_only

Then:

    from datasets import load_dataset
    ds = load_dataset("build/radgenome_red")      # train / validation / test

The same program as the console command ``med3dqwen-build-radgenome`` (installed with the package): ``--help`` prints
every option, the expected input and the output layout (:mod:`med3dqwen.scripts.build_radgenome`).
"""

from med3dqwen.scripts.build_radgenome import cli


if __name__ == "__main__":
    cli()
