"""ZeRO stage 2 (gradients + optimizer state sharded); --zero3 for stage 3 (parameters too).

Example: torchrun --nproc_per_node=2 train_zero_two.py --model_name demo --corpus_path corpus.dat
All flags: python train_zero_two.py --help (shared by every launcher, see README.md).
"""
from trainer import dist
from trainer.loop import main

if __name__ == "__main__":
    dist.run_process(lambda: main(stage=2))
