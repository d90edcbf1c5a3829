#!/usr/bin/env bash
# One command from a fresh checkout: install what is missing, then pretrain the tiny `demo`
# model on the shipped Korean sample (CPU or GPU), about a minute on 2 CPU cores.
# Extra arguments go to train.py (e.g. bash demo/run.sh --num_steps 200 --bf16). Run again, it
# resumes output/demo (--checkpoint auto): at step 40 already, it says so and trains nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install torch==2.13.0
fi
if ! python demo/check_requirements.py requirements.txt; then  # every line of it, versions included
  python -m pip install -r requirements.txt
fi
export TOKENIZERS_PARALLELISM=false
python train.py --model_name demo --model demo --corpus_path demo/reviews_sample.dat \
  --max_seq_length 128 --train_batch_size 16 --num_steps 40 --warmup_steps 4 --learning_rate 1e-3 \
  --logging_steps 5 --save_steps 20 --output_dir output --checkpoint auto "$@"
echo
echo "loss curve: output/demo/loss.tsv   TensorBoard: tensorboard --logdir output/demo/tensorboard"
echo "final weights: output/demo/final/model.safetensors"
