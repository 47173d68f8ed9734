"""Build M3D-VQA closed (multiple choice) and open questions (JSONL + dataset card; images stay where they are).

Usage:

    python datasets_scripts/build_m3d_vqa.py --data_root VQA --image_root CAP --output_dir build/m3d_vqa
    python datasets_scripts/build_m3d_vqa.py --data_root VQA --image_root CAP --output_dir OUT --mode closed \\
        --num_proc 16
    python datasets_scripts/build_m3d_vqa.py --data_root VQA --image_root CAP --output_dir OUT \\
        --test_csv M3D_VQA_test5k.csv

    # outline the structure a question names, from TotalSegmentator masks made for each image
    python datasets_scripts/build_m3d_vqa.py --data_root VQA --image_root CAP --output_dir OUT --prompt red \\
        --mask_source totalsegmentator_files --mask_dir TS_MASKS --write_png montage

Then:

    from datasets import load_dataset
    ds = load_dataset("build/m3d_vqa")      # train / validation / test

The same program as the console command ``med3dqwen-build-m3d-vqa`` (installed with the package): ``--help`` prints
every option, the expected input and the output layout (:mod:`med3dqwen.scripts.build_m3d_vqa`).
"""

from med3dqwen.scripts.build_m3d_vqa import cli


if __name__ == "__main__":
    cli()
