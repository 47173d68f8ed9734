"""Build the synthetic chest-CT phantom VQA dataset (the embedded default: no download, no GPU).

Usage:

    python datasets_scripts/build_phantom.py --output_dir build/phantom --num_volumes 20 --seed 0 --prompt red
    python datasets_scripts/build_phantom.py --output_dir build/phantom_none --num_volumes 20 --prompt none
    python datasets_scripts/build_phantom.py --output_dir build/small --shape 32 64 64 --write_png stack
    python datasets_scripts/build_phantom.py --output_dir build/big --num_volumes 5000 --num_proc 16

    # a cluster job array: every task builds one shard, then one merge
    python datasets_scripts/build_phantom.py --output_dir OUT --num_volumes 5000 --num_shards 8 --shard_index $I
    python datasets_scripts/build_phantom.py --output_dir OUT --num_volumes 5000 --num_shards 8 --merge_only

Then:

    from datasets import load_dataset
    ds = load_dataset("build/phantom")      # train / validation / test

The same program as the console command ``med3dqwen-build-phantom`` (installed with the package): ``--help`` prints
every option, the expected input and the output layout (:mod:`med3dqwen.scripts.build_phantom`).
"""

from med3dqwen.scripts.build_phantom import cli


if __name__ == "__main__":
    cli()
