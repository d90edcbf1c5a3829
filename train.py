"""Plain data-parallel training (one process, or DDP under torchrun).

Example: torchrun --nproc_per_node=2 train.py --model_name demo --corpus_path corpus.dat
All flags: python train.py --help (shared by every launcher, see README.md).
"""
from trainer import dist
from trainer.loop import main

if __name__ == "__main__":
    dist.run_process(lambda: main(stage=0))
