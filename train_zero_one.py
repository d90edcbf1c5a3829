"""ZeRO stage 1: optimizer state sharded across processes.

Example: torchrun --nproc_per_node=2 train_zero_one.py --model_name demo --corpus_path corpus.dat
All flags: python train_zero_one.py --help (shared by every launcher, see README.md).
"""
from trainer import dist
from trainer.loop import main

if __name__ == "__main__":
    dist.run_process(lambda: main(stage=1))
