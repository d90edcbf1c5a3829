"""Every hyperparameter of the three launchers, in one parser (`get_parse_args`).

`validate_args` checks what can be checked before any work starts (before the process group,
the corpus cache or the model exist) and exits with a message that names the fix.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from trainer.tracking import DEFAULT_EXPERIMENT, parse_report_to
from trainer.tracking import validate as validate_tracking

LAUNCHERS = {0: "train.py", 1: "train_zero_one.py", 2: "train_zero_two.py"}
TRAIN_MODES = ("pretrain", "mrc", "ict", "encoder", "classify", "ner", "nli", "sts")
ENGINES = ("torch", "deepspeed", "fairscale")
SEED_MAX = 2**32 - 1
_FINE_TUNING = ("mrc", "ict", "classify", "ner", "nli", "sts")
# Flags that shape some tasks only: (the train modes they act in, or a test of the arguments; where, for the
# message). Given elsewhere they would do nothing, e.g. --eval_file in pretraining (held-out text there is
# --eval_corpus), so a value other than the default is refused there.
MODE_FLAGS: dict[str, tuple] = {
    **{f: (("pretrain",), "--train_mode pretrain")
       for f in ("objective", "mlm_probability", "whole_word_mask", "corpus_path", "eval_corpus", "eval_samples")},
    **{f: (_FINE_TUNING, "the fine-tuning tasks (--train_mode " + ", ".join(_FINE_TUNING) + ")")
       for f in ("train_file", "eval_file", "max_train_examples", "max_eval_examples")},
    "doc_stride": (("mrc", "ner"), "--train_mode mrc and ner (windows over long inputs)"),
    "max_query_length": (("mrc", "ict", "encoder"), "--train_mode mrc, ict and encoder (the question side)"),
    "temperature": (lambda a: a.train_mode == "ict" or (a.train_mode == "pretrain" and a.objective == "ict"),
                    "--train_mode ict and --objective ict pretraining (the contrastive loss)"),
    "encode_file": (("encoder",), "--train_mode encoder"),
    "pooling": (lambda a: a.train_mode in ("ict", "encoder") or (a.train_mode == "pretrain" and a.objective == "ict"),
                "--train_mode ict and encoder and --objective ict pretraining (one vector per input)"),
    "unpad": (("classify", "ner", "nli", "sts", "mrc", "encoder"),
              "the tasks of variable-length inputs (classify, ner, nli, sts; mrc and encoder evaluation)"),
}
_INSTEAD = {("pretrain", "eval_file"): "; held-out text during pretraining is --eval_corpus SPEC (or --eval_fraction)",
            ("pretrain", "train_file"): "; pretraining text is --corpus_path SPEC"}


def flag_applies(flag: str, args) -> bool:
    """Whether `flag` acts in the run `args` describes (MODE_FLAGS; every other flag does)."""
    if flag not in MODE_FLAGS:
        return True
    modes = MODE_FLAGS[flag][0]
    return modes(args) if callable(modes) else args.train_mode in modes


def get_parse_args(stage: int = 0) -> argparse.ArgumentParser:
    """The shared parser. `stage` is the launcher's ZeRO stage (0 plain, 1, 2); only used in help."""
    p = argparse.ArgumentParser(
        prog=LAUNCHERS.get(stage, "train.py"),
        description="Pretrain or fine-tune a BERT-style encoder (see README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("run")
    g.add_argument("--model_name", required=True, help="name of the run: its logs and checkpoints go under output_dir/model_name")
    g.add_argument("--output_dir", default="output", help="where checkpoints, TensorBoard logs and the final weights go")
    g.add_argument("--checkpoint", default=None,
                   help="checkpoint to continue from: a step-N directory (or a file in it), a run directory "
                        "(its latest step), 'auto' (latest of this run if any, else start fresh), or an exported "
                        ".safetensors file / final directory or a transformers BERT / ModernBERT folder (weights "
                        "only). A checkpoint of another train_mode initialises the weights whose names and shapes "
                        "match (the encoder's at least).")
    g.add_argument("--seed", type=int, default=42, help="random seed; resuming reproduces the same data order")
    g.add_argument("--engine", choices=ENGINES, default="torch", help="training backend")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when available")

    g = p.add_argument_group("model and task")
    g.add_argument("--model", default=None,
                   help="model config: a name in configs/ (e.g. small, transformer, switch, mix_lm, bert-base, albert-base), "
                        "a JSON path, a folder holding a config.json (ours, or a transformers BERT / ModernBERT one) "
                        "or a step-N checkpoint; default: the config of --checkpoint, else small")
    g.add_argument("--train_mode", choices=TRAIN_MODES, default="pretrain", help="task (see README: Tasks)")
    g.add_argument("--objective", choices=("sop", "ict", "mlm"), default="sop",
                   help="pretrain: MLM plus SOP (sentence order) or ICT (inverse cloze); 'mlm' = MLM only, packed")
    g.add_argument("--mlm_probability", type=float, default=0.15, help="fraction of tokens masked for MLM")
    g.add_argument("--whole_word_mask", action="store_true", help="mask whole words (a head piece and its ## pieces; ▁/Ġ-marked words for other tokenizers)")
    g.add_argument("--mlm_separator", choices=("eod", "sep", "wrap"), default="sep",
                   help="--objective mlm rows: 'eod' = units run together, [EOD] after each document; 'sep' = [SEP] "
                        "after every unit (sentence or line); 'wrap' = every unit as [CLS] unit [SEP] (run_mlm's layout)")
    g.add_argument("--mlm_packing", choices=("units", "full"), default="full",
                   help="--objective mlm rows: 'units' = whole units packed greedily up to --max_seq_length; 'full' = "
                        "every row filled to --max_seq_length, units cut at row edges")

    g = p.add_argument_group("data")
    g.add_argument("--corpus_path", default=None,
                   help="pretraining corpus spec: a .dat text file (one sentence per line, blank line between "
                        "documents), a directory (every *.dat under it), a glob, or a comma list of these, each "
                        "optionally with :WEIGHT (e.g. wiki/:0.7,news/*.dat:0.3); a tokenized cache is built beside "
                        "each shard on first use (or by `python -m data.corpus build`) and reused")
    g.add_argument("--eval_corpus", default=None,
                   help="pretrain: held-out corpus spec for validation (like --corpus_path); or use --eval_fraction")
    g.add_argument("--eval_steps", type=int, default=0,
                   help="pretrain: validate every N optimizer steps (0 = only at the end); needs --eval_corpus "
                        "or --eval_fraction")
    g.add_argument("--eval_samples", type=int, default=1000,
                   help="pretrain: validation samples (a fixed set with fixed masks, sharded over the processes)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (tokenizer.json; or the path of that tokenizer.json); default <corpus>.tokenizer beside the corpus, "
                        "trained there with the model's vocab_size if missing")
    g.add_argument("--morpheme", choices=("none", "mecab", "kiwi"), default="none",
                   help="morpheme-aware pre-tokenization when a tokenizer is trained automatically; with "
                        "--tokenizer or a checkpoint's tokenizer, their pretokenizer.json decides, and a different "
                        "--morpheme is refused")
    g.add_argument("--max_seq_length", type=int, default=128,
                   help="maximum tokens per input; must not exceed the model's max_position_embedding")
    g.add_argument("--num_workers", type=int, default=1, help="DataLoader worker processes per rank (0 = in the main process)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=32,
                   help="per-device micro-batch size; 0 (ZeRO launchers) = find the largest that fits")
    g.add_argument("--max_memory_mb", type=int, default=0,
                   help="with --train_batch_size 0: per-process memory budget in MB (CPU default: 80%% of RAM / local processes; GPU: device memory)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=float, default=2e-4, help="peak learning rate (pretraining 2e-4, fine-tuning 5e-5)")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (not on biases and LayerNorm)")
    g.add_argument("--adam_epsilon", type=float, default=1e-6, help="AdamW epsilon")
    g.add_argument("--adam_betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0 = off)")
    g.add_argument("--num_steps", type=int, default=1000, help="total optimizer steps to train (fine-tuning tasks: 0 = only evaluate --checkpoint)")
    g.add_argument("--scheduler_num_steps", type=int, default=0,
                   help="length of the LR schedule (0 = num_steps); may exceed num_steps so training stops before LR reaches 0")
    g.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up from 0 to learning_rate")
    g.add_argument("--lr_schedule", choices=("linear", "wsd"), default="linear",
                   help="after warm-up: linear = linear decay to 0 at the end of the schedule; wsd = "
                        "warmup-stable-decay: constant learning_rate, then 1-sqrt decay to 0 over the last --decay_steps")
    g.add_argument("--decay_steps", type=int, default=0,
                   help="--lr_schedule wsd: steps of the final decay (they end the schedule of "
                        "--scheduler_num_steps or --num_steps steps)")
    g.add_argument("--max_steps_per_epoch", type=int, default=0,
                   help="optimizer steps of samples one epoch draws (0 = the whole data set); "
                        "batch x accumulation x processes x this must not exceed the data size")
    g.add_argument("--fp16", action="store_true", help="automatic mixed precision, float16 with loss scaling")
    g.add_argument("--bf16", action="store_true", help="automatic mixed precision, bfloat16")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each encoder layer (regional: DDP, FSDP2 and ZeRO keep working; the "
                        "first steps are slower while it compiles)")
    g.add_argument("--max_bad_steps", type=int, default=5,
                   help="stop (after saving a checkpoint) when this many consecutive steps have non-finite loss or gradients")

    g = p.add_argument_group("sharding")
    g.add_argument("--zero3", action="store_true", help="train_zero_two.py only: ZeRO stage 3 (parameters sharded too)")
    g.add_argument("--auto_wrap", action="store_true",
                   help="ZeRO-2/3: one FSDP unit per layer (a shared ALBERT layer group is wrapped once)")
    g.add_argument("--deepspeed_config", default=None, help="--engine deepspeed: a DeepSpeed JSON merged over the generated one")
    g.add_argument("--cpu_offload", action="store_true", help="--engine deepspeed (ZeRO-2/3): offload optimizer state to CPU")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--logging_steps", type=int, default=10, help="TensorBoard / loss.tsv logging interval (optimizer steps)")
    g.add_argument("--save_steps", type=int, default=500, help="checkpoint interval (optimizer steps; 0 = only at the end)")
    g.add_argument("--keep_checkpoints", type=int, default=3, help="keep this many newest step-N checkpoints (0 = all)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    g.add_argument("--report_to", type=parse_report_to, default="tensorboard",
                   help="comma-separated trackers for parameters, metrics and artifacts, on rank 0: tensorboard, "
                        "mlflow, wandb (e.g. tensorboard,mlflow; mlflow and wandb need `pip install mlflow` / "
                        "`wandb`); loss.tsv is always written")
    g.add_argument("--tracking_uri", default=None,
                   help="MLflow tracking URI: http(s)://HOST:PORT of an `mlflow server`, sqlite:///PATH.db, ... "
                        "(default $MLFLOW_TRACKING_URI, else sqlite:///output_dir/model_name/mlruns/mlflow.db)")
    g.add_argument("--experiment_name", default=None,
                   help="MLflow experiment and W&B project (default $MLFLOW_EXPERIMENT_NAME / $WANDB_PROJECT, "
                        f"else {DEFAULT_EXPERIMENT})")

    g = p.add_argument_group("downstream probes during pretraining")
    g.add_argument("--probe_steps", type=int, default=0,
                   help="pretrain: every N optimizer steps (and at the last step) fine-tune a copy of the encoder on "
                        "a small fixed slice of each --probe_tasks task and log probe/<task>/<metric> (0 = off; "
                        "docs/tasks.md: Probing during pretraining)")
    g.add_argument("--probe_tasks", default="nsmc",
                   help="comma-separated trainer.evaluate tasks to probe: nsmc, korquad, ner, nli, sts, ict")
    g.add_argument("--probe_data_dir", default=None,
                   help="the probes' data (nsmc/, korquad/, klue/); default ../shared/data beside the repository, "
                        "as trainer.evaluate")
    g.add_argument("--probe_set", action="append", default=[], metavar="TASK.FLAG=VALUE",
                   help="override a flag of a probe's recipe (trainer.evaluate's --set), e.g. "
                        "nsmc.max_train_examples=256 or all.max_seq_length=64; repeatable")

    g = p.add_argument_group("fine-tuning tasks (mrc, ict, encoder, classify)")
    g.add_argument("--train_file", default=None, help="mrc: KorQuAD/SQuAD JSON (or datasets' flat JSON lines); ict: KorQuAD JSON or TSV pairs; classify: TSV, CSV or JSON (id, document, label; KLUE YNAT); "
                        "ner: KLUE NER TSV or CoNLL-style word/tag lines; nli/sts: KLUE NLI/STS JSON or KorNLI/KorSTS TSV")
    g.add_argument("--eval_file", default=None, help="held-out file for evaluation at the end (same format as train_file)")
    g.add_argument("--eval_fraction", type=float, default=None,
                   help="pretrain: fraction of the corpus documents held out for validation (by a hash of their "
                        "position; default none). Fine-tuning, default 0.1: "
                        "with no eval_file: fraction of train_file held out for evaluation (mrc/ict: whole "
                        "articles; classify: rows; ner/nli/sts: by a hash of each guid, see docs/tasks.md)")
    g.add_argument("--max_train_examples", type=int, default=0,
                   help="use only the first N training examples (questions, pairs or rows; 0 = all), for short runs")
    g.add_argument("--max_eval_examples", type=int, default=0,
                   help="evaluate only the first N held-out examples (questions or rows; 0 = all)")
    g.add_argument("--num_labels", type=int, default=0,
                   help="classify: number of classes (0 = from the labels: class indices 0..C-1 without gaps, "
                        "or label names, numbered in sorted order); give it when a class is absent from the files")
    g.add_argument("--doc_stride", type=int, default=128,
                   help="mrc: overlap stride between context windows; ner: tokens between the starts of the windows of a long sentence")
    g.add_argument("--crf", action="store_true", help="ner: a CRF layer over the character tags (Viterbi decoding)")
    g.add_argument("--max_query_length", type=int, default=64, help="mrc/ict: maximum question tokens")
    g.add_argument("--temperature", type=float, default=0.05, help="ict: softmax temperature of the contrastive loss")
    g.add_argument("--pooling", choices=("auto", "cls", "mean"), default="auto",
                   help="ict/encoder: how one vector is pooled per input; auto = the pooling --checkpoint was "
                        "retrieval-trained with (ict), else mean ([CLS] of a pretrain-only model is no sentence vector)")
    g.add_argument("--encode_file", default=None, help="encoder: text file to encode (one passage per line, or id<TAB>text)")
    g.add_argument("--eval_batch_size", type=int, default=64, help="batch size for evaluation and encoding")
    g.add_argument("--unpad", choices=("auto", "off"), default="auto",
                   help="auto: batches of similar lengths, each padded to its own longest row (classify, ner, "
                        "nli, sts training and evaluation; mrc and encoder evaluation), where the outputs equal "
                        "the padded ones (not with Switch MoE layers); off: random batches as before. See "
                        "docs/modern.md")
    return p


NAME_MAX = 255  # bytes in one file or folder name (ext4, xfs, btrfs, NFS, Lustre)


def _hub_hint(spec: str) -> str:
    from models.config import hub_id_hint  # (models imports torch: only on this error path)

    return hub_id_hint(spec)


def _fail(parser: argparse.ArgumentParser, message: str) -> None:
    parser.error(message)


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser, stage: int) -> None:
    """Checks that need no process group, the corpus or a model (the model config is only read)."""
    launcher = LAUNCHERS[stage]
    nonneg = ["train_batch_size", "max_memory_mb", "warmup_steps", "decay_steps", "max_steps_per_epoch", "save_steps",
              "keep_checkpoints", "num_workers", "scheduler_num_steps", "max_train_examples",
              "max_eval_examples", "num_steps"]
    positive = ["gradient_accumulation_steps", "max_seq_length", "logging_steps", "max_bad_steps",
                "eval_batch_size", "doc_stride", "max_query_length"]
    for action in parser._actions:  # every float flag: NaN/inf pass the range checks below unnoticed
        values = getattr(args, action.dest, None)
        if action.type is float and values is not None:
            for v in (values if isinstance(values, (list, tuple)) else [values]):
                if not math.isfinite(v):
                    _fail(parser, f"{action.option_strings[0]} must be a finite number, got {v}"
                                  f"{'' if action.default is None else f' (default {action.default})'}")
    for name in nonneg:
        if getattr(args, name) < 0:
            _fail(parser, f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in positive:
        if getattr(args, name) <= 0:
            _fail(parser, f"--{name} must be > 0, got {getattr(args, name)}")
    if args.num_steps == 0 and args.train_mode == "pretrain":
        _fail(parser, "--num_steps must be > 0 for pretraining (0 = evaluate only, for the fine-tuning tasks)")
    for name in ("learning_rate", "adam_epsilon", "temperature"):
        if not getattr(args, name) > 0:
            _fail(parser, f"--{name} must be > 0, got {getattr(args, name)}")
    for name in ("weight_decay", "max_grad_norm"):
        if getattr(args, name) < 0:
            _fail(parser, f"--{name} must be >= 0, got {getattr(args, name)}")
    for i, beta in enumerate(args.adam_betas):
        if not 0 <= beta < 1:
            _fail(parser, f"--adam_betas: beta{i + 1} must be in [0, 1), got {beta}; the usual values are "
                          f"--adam_betas 0.9 0.999")
    if not 0 <= args.seed <= SEED_MAX:
        _fail(parser, f"--seed must be between 0 and {SEED_MAX} (2^32 - 1, what numpy accepts), got {args.seed}")
    if args.num_labels == 1 or args.num_labels < 0:
        _fail(parser, f"--num_labels must be 0 (= from the labels in the data) or >= 2, got {args.num_labels}")
    if args.num_labels and args.train_mode != "classify":
        _fail(parser, "--num_labels is for --train_mode classify")
    if args.device == "cuda":
        _check_cuda(parser)
    for flag in ("mlm_separator", "mlm_packing"):
        if getattr(args, flag) != parser.get_default(flag) and (args.train_mode != "pretrain" or args.objective != "mlm"):
            _fail(parser, f"--{flag} {getattr(args, flag)} shapes --objective mlm rows only (here: --train_mode "
                          f"{args.train_mode}, --objective {args.objective}); drop it or pass --objective mlm")
    if not 0 < args.mlm_probability < 1:
        _fail(parser, f"--mlm_probability must be between 0 and 1, got {args.mlm_probability}")
    if args.eval_fraction is None and args.train_mode != "pretrain":
        args.eval_fraction = 0.1
    if args.eval_fraction is not None and not 0 < args.eval_fraction < 1:
        _fail(parser, f"--eval_fraction must be between 0 and 1, got {args.eval_fraction}")
    if args.zero3 and stage != 2:
        _fail(parser, f"--zero3 only works with train_zero_two.py (ZeRO-3 = ZeRO-2 + sharded parameters); "
                      f"run `train_zero_two.py --zero3 ...` instead of {launcher}")
    if args.fp16 and args.bf16:
        _fail(parser, "--fp16 and --bf16 are exclusive: pick one mixed-precision type")
    if args.train_batch_size == 0 and stage == 0:
        _fail(parser, "--train_batch_size 0 (find the largest batch that fits) is for the ZeRO launchers "
                      "train_zero_one.py / train_zero_two.py; give train.py a batch size > 0")
    if args.scheduler_num_steps and args.scheduler_num_steps < args.num_steps:
        _fail(parser, f"--scheduler_num_steps ({args.scheduler_num_steps}) must be >= --num_steps ({args.num_steps}) "
                      f"or 0 (= num_steps)")
    from trainer.engines.base import schedule_steps

    total = schedule_steps(args)
    if args.warmup_steps > total:
        _fail(parser, f"--warmup_steps ({args.warmup_steps}) exceeds the schedule length ({total} steps)")
    if args.lr_schedule == "wsd":
        if args.decay_steps <= 0:
            _fail(parser, "--lr_schedule wsd needs --decay_steps > 0 (the final decay; e.g. 10-20%% of the schedule)"
                  .replace("%%", "%"))
        if args.warmup_steps + args.decay_steps > total:
            _fail(parser, f"--warmup_steps ({args.warmup_steps}) + --decay_steps ({args.decay_steps}) exceed the "
                          f"schedule length ({total} steps: --scheduler_num_steps or --num_steps)")
    elif args.decay_steps:
        _fail(parser, "--decay_steps is the final decay of --lr_schedule wsd; add --lr_schedule wsd or drop it")
    from trainer.engines import engine_class

    # engine-specific flags: one check per engine (Engine.flag_problems)
    for problem in engine_class(args.engine).flag_problems(args, 3 if stage == 2 and args.zero3 else stage):
        _fail(parser, problem)
    if args.deepspeed_config and not Path(args.deepspeed_config).is_file():
        _fail(parser, f"--deepspeed_config {args.deepspeed_config}: no such file")
    if args.train_mode == "pretrain":
        if not args.corpus_path:
            _fail(parser, "--train_mode pretrain needs --corpus_path (a .dat text file: one sentence per line, "
                          "a blank line between documents)")
        _check_pretrain_data(args, parser)
    elif args.train_mode in _FINE_TUNING and not args.train_file and args.num_steps > 0:
        _fail(parser, f"--train_mode {args.train_mode} needs --train_file")
    for flag in MODE_FLAGS:
        if getattr(args, flag) != parser.get_default(flag) and not flag_applies(flag, args):
            mode = args.train_mode + (f" --objective {args.objective}" if args.train_mode == "pretrain" else "")
            _fail(parser, f"--{flag} {getattr(args, flag)} does nothing with --train_mode {mode}: it is for "
                          f"{MODE_FLAGS[flag][1]}{_INSTEAD.get((args.train_mode, flag), '')}; drop it")
    if args.crf and args.train_mode != "ner":
        _fail(parser, f"--crf is a layer of the ner task; drop it for --train_mode {args.train_mode}")
    if args.train_mode == "encoder" and not args.encode_file:
        _fail(parser, "--train_mode encoder needs --encode_file (one passage per line, or id<TAB>text)")
    for name in ("train_file", "eval_file", "encode_file"):
        value = getattr(args, name)
        if value and not Path(value).is_file():
            _fail(parser, f"--{name} {value}: no such file")
    if args.tokenizer:  # its tokenizer.json file (as KoTokenizer.load and `data.corpus build` take it): its folder
        from data.tokenizer import tokenizer_folder

        args.tokenizer = str(tokenizer_folder(args.tokenizer))
    if args.tokenizer and not (Path(args.tokenizer) / "tokenizer.json").is_file():
        from data.tokenizer import missing_tokenizer_hint

        given = Path(args.tokenizer)
        if given.is_file() and given.suffix == ".json":  # e.g. Tokenizer.save("my_tokenizer.json")
            _fail(parser, f"--tokenizer {given}: a tokenizer file is read as tokenizer.json in its folder (beside "
                          f"its pretokenizer.json, vocab.txt, ...); copy it to a new folder as DIR/tokenizer.json "
                          f"and pass --tokenizer DIR")
        _fail(parser, f"--tokenizer {args.tokenizer}: no tokenizer.json there; "
                      f"{missing_tokenizer_hint(args.tokenizer)}{_hub_hint(args.tokenizer)}")
    if args.tokenizer:
        from data.tokenizer import KoTokenizer, TokenizerError

        try:
            KoTokenizer.load(args.tokenizer)  # not JSON, not a tokenizer, special ids, pretokenizer.json
        except TokenizerError as e:
            _fail(parser, f"--tokenizer {args.tokenizer}: {e}")
    if (args.model_name in ("", ".", "..") or "/" in args.model_name or "\0" in args.model_name
            or (os.altsep and os.altsep in args.model_name) or os.sep in args.model_name):
        _fail(parser, f"--model_name {args.model_name!r}: must be a plain folder name (not empty, '.' or '..', no "
                      f"'/'): the run directory is --output_dir/--model_name; choose the location with --output_dir")
    out = Path(args.output_dir)
    for flag, part in [("--output_dir", part) for part in out.parts] + [("--model_name", args.model_name)]:
        if len(os.fsencode(part)) > NAME_MAX:
            _fail(parser, f"{flag}: {part[:40]}... is {len(os.fsencode(part))} bytes long; a file or folder name "
                          f"may have at most {NAME_MAX} bytes (in UTF-8; a Hangul syllable takes 3): pick a "
                          f"shorter {flag}")
    for path in (out, out / args.model_name):
        try:
            is_file = path.exists() and not path.is_dir()
        except OSError as e:  # no permission to look there, a path longer than the system allows, ...
            _fail(parser, f"--output_dir/--model_name: cannot use {path}: {e.strerror}; "
                          f"pick another --output_dir or --model_name")
        if is_file:
            _fail(parser, f"--output_dir/--model_name: {path} exists and is not a directory; "
                          f"pick another --output_dir or --model_name")
    from models import load_config

    if args.model is None:
        args.model = checkpoint_model(args) or "small"
    try:
        config = load_config(args.model)
    except (ValueError, FileNotFoundError) as e:
        _fail(parser, f"--model {args.model}: {e}")
    from data.tokenizer import vocab_size_problem

    if vocab_size_problem(config.vocab_size):
        _fail(parser, f"--model {args.model}: {vocab_size_problem(config.vocab_size)}; set \"vocab_size\" "
                      f"in the config to the size of your tokenizer")
    pairs = {"mrc": "question and context", "pretrain": "the two segments of --objective sop",
             "nli": "premise and hypothesis", "sts": "the two sentences"}
    if config.type_vocab_size < 2 and args.train_mode in pairs and (args.train_mode != "pretrain"
                                                                    or args.objective == "sop"):
        _fail(parser, f"--model {args.model}: type_vocab_size {config.type_vocab_size} gives one segment type, "
                      f"but --train_mode {args.train_mode} marks {pairs[args.train_mode]} as types 0 and 1; "
                      f"set \"type_vocab_size\": 2"
                      + (" or use --objective mlm" if args.train_mode == "pretrain" else ""))
    if args.max_seq_length > config.max_position_embedding:
        _fail(parser, f"--max_seq_length {args.max_seq_length} exceeds the model's max_position_embedding "
                      f"{config.max_position_embedding} ({args.model}); lower --max_seq_length or use a config "
                      f"with a larger max_position_embedding")
    if args.checkpoint and args.checkpoint != "auto" and not Path(args.checkpoint).exists():
        _fail(parser, f"--checkpoint {args.checkpoint}: no such file or directory "
                      f"(use --checkpoint auto to resume from the latest checkpoint when there is one)"
                      f"{_hub_hint(args.checkpoint)}")
    from trainer import probe

    probe.check(args, parser)
    problem = validate_tracking(args, run_dir(args))  # last: it may ask a tracking server
    if problem:
        _fail(parser, problem)


def _check_cuda(parser: argparse.ArgumentParser) -> None:
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no GPU or driver visible"
        _fail(parser, f"--device cuda: CUDA is not available here ({build}); use --device cpu, or --device "
                      f"auto (cuda when available)")
    local_rank = int(os.environ.get("LOCAL_RANK") or 0)
    if local_rank >= torch.cuda.device_count():
        _fail(parser, f"--device cuda: local rank {local_rank} has no GPU (this node shows "
                      f"{torch.cuda.device_count()}); start at most that many processes per node")


def _check_pretrain_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Corpus specs resolve to readable text shards; validation has data when asked for."""
    from data.spec import SpecError, resolve

    for flag in ("corpus_path", "eval_corpus"):
        value = getattr(args, flag)
        if value is None:
            continue
        try:
            resolve(value)
        except SpecError as e:
            _fail(parser, f"--{flag} {e}" if str(e).startswith(value.split(",")[0].rsplit(":", 1)[0])
                  else f"--{flag} {value}: {e}")
    if args.eval_corpus and args.eval_fraction is not None:
        _fail(parser, "--eval_corpus and --eval_fraction both choose the validation data; give one of them")
    if args.eval_samples <= 0:
        _fail(parser, f"--eval_samples must be > 0, got {args.eval_samples}")
    if args.eval_steps < 0:
        _fail(parser, f"--eval_steps must be >= 0, got {args.eval_steps}")
    if args.eval_steps and not (args.eval_corpus or args.eval_fraction):
        _fail(parser, "--eval_steps needs validation data: add --eval_corpus SPEC (held-out text) or "
                      "--eval_fraction F (hold out that fraction of the corpus documents)")


def parse_args(stage: int, argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_parse_args(stage)
    args = parser.parse_args(argv)
    args.stage = 3 if (stage == 2 and args.zero3) else stage
    args.launcher = LAUNCHERS[stage]
    validate_args(args, parser, stage)
    args._parser = parser
    return args


def checkpoint_model(args: argparse.Namespace) -> str | None:
    """Where the config of --checkpoint is, as --model takes it (its step-N, or the folder of its weights
    holding a config.json); None without a checkpoint or one that cannot be read (its own error comes later)."""
    if not args.checkpoint:
        return None
    from trainer import checkpoint

    try:
        path, kind = checkpoint.resolve(args.checkpoint, run_dir(args))
    except (checkpoint.CheckpointError, OSError):
        return None
    if kind == "step":
        return str(path)
    if kind == "weights" and (path.parent / "config.json").is_file():
        return str(path.parent)
    return None


def run_dir(args: argparse.Namespace) -> Path:
    return Path(args.output_dir) / args.model_name


def public_args(args: argparse.Namespace) -> dict:
    """The arguments as written to TensorBoard and checkpoints."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")} | {"argv": sys.argv, "cwd": os.getcwd()}


def markdown_table() -> str:
    """The flags as the README's table (`python -m trainer.args`)."""
    parser = get_parse_args()
    rows = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        rows.append(f"| **{group.title}** | | |")
        for a in actions:
            default = "required" if a.required else ("" if a.default in (None, False) else f"`{a.default}`")
            help_text = (a.help or "").replace("%%", "%").replace("|", "\\|")
            choices = f" ({', '.join(map(str, a.choices))})" if a.choices else ""
            rows.append(f"| `{a.option_strings[0]}` | {default} | {help_text}{choices} |")
    return "| flag | default | meaning |\n| --- | --- | --- |\n" + "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
