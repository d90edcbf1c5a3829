"""Model configs, tokenizer training and imported models the way users write and bring them: config
JSON as editors save it (a byte-order mark, comments, a key written twice, transformers' key names), a
Switch layer pattern that leaves no MoE layer, a `transformers` folder without "architectures" or with
sharded weights, a folder whose tokenizer is not its model's, tokenizers of tiny vocabularies, weighted
inputs and a model's folder as `--out`. Each case runs the real code (`load_config`, `load_source`,
`trainer.loop.main` in this process, `python -m data.tokenizer`'s main) and checks what the user sees
and that nothing of theirs changed (docs/operations.md, "Bad input")."""
from __future__ import annotations

import itertools
import json
import logging
import shutil

import pytest
import torch

from models import load_config
from models.config import ModelConfig
from tests.conftest import NSMC_CORPUS
from tests.launch_util import train_args, tree_digest
from tests.test_safety import _main
from tests.trainer_util import TINY_CONFIG, write_config

transformers = pytest.importorskip("transformers")

BERT = dict(vocab_size=2000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


def _hf_folder(path, model, tokenizer_dir=None, **save):
    model.save_pretrained(path, **save)
    for name in ("tokenizer.json", "vocab.txt"):
        if tokenizer_dir is not None:
            shutil.copy2(tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def bert_mlm():
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(transformers.BertConfig(**BERT)).eval()


# --- model config JSON ------------------------------------------------------------------------
def test_config_with_a_byte_order_mark_loads(tmp_path):
    """Notepad and some editors save UTF-8 with a BOM; json.loads refused it ("Unexpected UTF-8 BOM")."""
    plain, bom = tmp_path / "plain.json", tmp_path / "bom.json"
    write_config(plain)
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert load_config(bom) == load_config(plain) == ModelConfig.from_dict(TINY_CONFIG)


@pytest.mark.parametrize("text, said", [
    ('{\n  // my model\n  "vocab_size": 2000\n}', "not valid JSON: Expecting property name enclosed in double quotes "
                                                   "at line 2 column 3 ('// my model'); JSON has no comments (// or #), "
                                                   "no trailing comma"),
    ('{"vocab_size": 2000,\n "hidden_size": 32,\n}', "at line 3 column 1 ('}'); JSON has no comments"),
    ("", "not valid JSON: Expecting value at line 1 column 1 (the file is empty)"),
    ('{"vocab_size": 2000, "hidden_size": 32, "vocab_size": 1000}',
     "key 'vocab_size' appears twice (values 2000 and 1000; JSON keeps only the last); keep one of them"),
])
def test_config_json_mistakes_name_the_line_and_the_fix(tmp_path, text, said):
    """Comments and trailing commas gave the decoder's bare message; a repeated key was read silently (the
    last value won, so editing the first did nothing)."""
    path = tmp_path / "mine.json"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        load_config(path)
    assert said in str(e.value) and str(path) in str(e.value)


def test_transformers_key_names_in_our_config_are_named_with_ours(tmp_path):
    path = write_config(tmp_path / "mine.json", num_attention_heads=2, intermediate_size=64)
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['intermediate_size', 'num_attention_heads'\] "
                                         r"\(transformers' names; ours: intermediate_size -> ff_dim, "
                                         r"num_attention_heads -> num_heads\)"):
        load_config(path)


@pytest.mark.parametrize("model_type, said", [
    ("albert", 'ALBERT is "model_type": "transformer" with "layer_group" (shared layers) and "embedding_size"'),
    ("switch", 'a Switch Transformer is "model_type": "transformer" with "n_experts" > 1'),
    ("bert", 'BERT is "model_type": "transformer"'),
])
def test_model_type_of_a_readme_name_says_which_keys_make_it(tmp_path, model_type, said):
    """The README's table names configs `albert` and `switch`; a config written with those as its model_type was
    told only the three valid types."""
    with pytest.raises(ValueError) as e:
        load_config(write_config(tmp_path / "mine.json", model_type=model_type))
    assert f"model_type must be one of ('transformer', 'mix_lm', 'modernbert'), got '{model_type}': {said}" in str(e.value)


@pytest.mark.parametrize("overrides, ok", [
    ({"n_experts": 4, "moe_layer_interval": 2}, True),            # layer 1 of 2 is MoE
    ({"n_experts": 4, "moe_layer_interval": 3}, False),           # none of 2 layers
    ({"n_experts": 4, "moe_layer_interval": 2, "num_hidden_layers": 4, "layer_group": 4}, False),  # 1 distinct layer
    ({"n_experts": 1, "moe_layer_interval": 3}, True),            # dense anyway: the interval means nothing
])
def test_switch_interval_that_leaves_no_moe_layer_is_refused(tmp_path, overrides, ok):
    """n_experts 4 with moe_layer_interval beyond the distinct layers trained a dense model (aux loss 0) under
    the name of a Switch Transformer."""
    path = write_config(tmp_path / "switch.json", **overrides)
    if ok:
        config = load_config(path)
        assert config.n_experts == 1 or any(config.is_moe_layer(j) for j in range(config.num_distinct_layers))
        return
    with pytest.raises(ValueError, match=r"moe_layer_interval \(\d\) leaves none of the \d distinct layer\(s\) a Switch "
                                         r"FFN .* set \"moe_layer_interval\" to at most \d \(1 = every layer\), or "
                                         r"\"n_experts\": 1"):
        load_config(path)


# --- transformers folders ---------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_transformers_config_without_architectures_or_version(tmp_path, family, bert_mlm):
    """A config.json with neither "architectures" nor "transformers_version" (hand-written or trimmed) was read
    as ours and failed with "unknown model config key(s)"; it reads as the transformers config it is."""
    from trainer.export import load_source

    if family == "bert":
        model = bert_mlm
    else:
        torch.manual_seed(0)
        model = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(
            vocab_size=2000, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, local_attention=16, global_attn_every_n_layers=2, pad_token_id=0))
    full = _hf_folder(tmp_path / "full", model)
    trimmed = _hf_folder(tmp_path / "trimmed", model)
    config = json.loads((trimmed / "config.json").read_text())
    del config["architectures"], config["transformers_version"]
    (trimmed / "config.json").write_text(json.dumps(config))
    assert load_config(trimmed) == load_config(full)
    got, want = load_source(trimmed), load_source(full)
    assert got.config == want.config and "mlm_head.bias" in got.state
    assert got.state.keys() == want.state.keys() and all(torch.equal(got.state[k], want.state[k]) for k in got.state)


def test_sharded_transformers_folder_is_read_whole(tmp_path, bert_mlm):
    """save_pretrained(max_shard_size=...) writes model.safetensors.index.json and shards; such a folder was
    refused (as a training --checkpoint: "not a checkpoint ... not an exported model")."""
    from trainer import checkpoint
    from trainer.export import load_source

    whole = _hf_folder(tmp_path / "whole", bert_mlm)
    sharded = _hf_folder(tmp_path / "sharded", bert_mlm, max_shard_size="40KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (sharded / "model.safetensors").exists()
    assert checkpoint.resolve(str(sharded), tmp_path) == (sharded / "model.safetensors.index.json", "weights")
    got, want = load_source(sharded), load_source(whole)
    assert got.state.keys() == want.state.keys() and all(torch.equal(got.state[k], want.state[k]) for k in got.state)
    # the older format: pytorch_model.bin shards and their index
    old = tmp_path / "bin_shards"
    old.mkdir()
    shutil.copy2(whole / "config.json", old / "config.json")
    hf_state = {k: v.contiguous() for k, v in bert_mlm.state_dict().items()}
    names = sorted(hf_state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: hf_state[k] for k in part}, old / file)
        weight_map |= dict.fromkeys(part, file)
    (old / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    got = load_source(old)
    assert got.state.keys() == want.state.keys() and all(torch.equal(got.state[k], want.state[k]) for k in got.state)
    # a shard that did not get copied is named
    shards[1].unlink()
    with pytest.raises(checkpoint.CheckpointError, match=rf"names {len(shards)} shard\(s\) and 1 are missing beside it "
                                                         rf"\({shards[1].name}\); copy the whole folder again"):
        load_source(sharded)


def test_sharded_transformers_folder_starts_a_run(tmp_path, tiny_corpus, tiny_tokenizer_dir, bert_mlm,
                                                   monkeypatch, capsys):
    folder = _hf_folder(tmp_path / "hf", bert_mlm, tiny_tokenizer_dir, max_shard_size="40KB")
    argv = train_args(tiny_corpus, tiny_tokenizer_dir, folder, tmp_path / "out", "from_shards", "--checkpoint",
                      str(folder), "--objective", "mlm", "--num_steps", "1", "--save_steps", "0",
                      "--max_seq_length", "32")
    code, said = _main(argv, monkeypatch, capsys)
    assert code == 0, said[-3000:]
    assert f"initialised matching weights from {folder / 'model.safetensors.index.json'}" in said
    assert "left as initialised" not in said  # encoder and MLM head all came from the shards
    assert (tmp_path / "out" / "from_shards" / "final" / "model.safetensors").is_file()


def test_folder_whose_tokenizer_is_not_its_models(tmp_path, tiny_corpus, tiny_tokenizer_dir, monkeypatch, capsys):
    """Weights of 1,000 rows beside a 2,000-token tokenizer: the message told to retrain the tokenizer or to set
    vocab_size in the model config, neither of which fixes a folder of trained weights."""
    torch.manual_seed(0)
    folder = _hf_folder(tmp_path / "hf", transformers.BertForMaskedLM(transformers.BertConfig(**BERT | {
        "vocab_size": 1000})), tiny_tokenizer_dir)
    before = tree_digest(folder)
    argv = train_args(tiny_corpus, tiny_tokenizer_dir, folder, tmp_path / "out", "mismatch", "--checkpoint",
                      str(folder), "--objective", "mlm", "--num_steps", "1")
    argv = argv[:argv.index("--tokenizer")] + argv[argv.index("--tokenizer") + 2:]  # the folder's own tokenizer
    code, said = _main(argv, monkeypatch, capsys)
    assert code != 0
    assert (f"--checkpoint {folder}: the tokenizer beside its weights ({folder}/tokenizer.json) has 2000 tokens but "
            f"the weights have 1000 embedding rows (vocab_size of its config.json), so it is not the tokenizer this "
            f"model was trained with; put the model's own tokenizer.json there, or pass it with --tokenizer DIR") in said
    assert tree_digest(folder) == before and not (tmp_path / "out" / "mismatch").exists()


# --- tokenizer training -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    if not NSMC_CORPUS.exists():
        pytest.skip(f"{NSMC_CORPUS} not available")
    path = tmp_path_factory.mktemp("tok_corpus") / "small.dat"
    with open(NSMC_CORPUS, "rb") as src:
        path.write_bytes(b"".join(itertools.islice(src, 600)))
    return path


@pytest.mark.parametrize("vocab_size", [8, 100, 200])
def test_small_vocabularies_train_to_their_exact_size(tmp_path, small_corpus, vocab_size):
    """Below ~300 every size failed after both training passes ("the trainer produced 202 tokens, more than
    vocab_size=100 (the alphabet alone is large)"): the alphabet kept at least 100 characters (and their ##
    forms) whatever the size. 8 is the documented minimum (the special tokens and two pieces)."""
    from data.tokenizer import KoTokenizer, train_tokenizer

    tok = train_tokenizer([small_corpus], vocab_size, tmp_path / "tok")
    assert tok.vocab_size == vocab_size == KoTokenizer.load(tmp_path / "tok").vocab_size
    assert len((tmp_path / "tok" / "vocab.txt").read_text(encoding="utf-8").splitlines()) == vocab_size
    if vocab_size >= 100:  # the most frequent syllables are pieces: the corpus's commonest word is no [UNK]
        assert tok.encode("영화") and tok.unk_id not in tok.encode("영화")


def test_weighted_input_says_the_weights_do_not_apply(tmp_path, small_corpus, caplog):
    from data.tokenizer import train_tokenizer

    a, b = tmp_path / "a.dat", tmp_path / "b.dat"
    lines = small_corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    a.write_text("".join(lines[:300]), encoding="utf-8")
    b.write_text("".join(lines[300:]), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="data.tokenizer"):
        weighted = train_tokenizer(f"{a}:0.9,{b}:0.1", 300, tmp_path / "weighted")
    assert f"the sampling weights in {a}:0.9,{b}:0.1 do not apply to tokenizer training" in caplog.text
    plain = train_tokenizer(f"{a},{b}", 300, tmp_path / "plain")
    assert weighted.fingerprint == plain.fingerprint


def test_training_over_a_models_tokenizer_is_refused_even_with_overwrite(tmp_path, small_corpus, tiny_tokenizer_dir,
                                                                         bert_mlm, capsys):
    """`--out` naming a model's folder (a run's final/, an export, a transformers folder) with --overwrite replaced
    the tokenizer its embeddings were trained on."""
    from data.tokenizer import main

    folder = _hf_folder(tmp_path / "hf", bert_mlm, tiny_tokenizer_dir)
    before = tree_digest(folder)
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as e:
            main(["train", "--input", str(small_corpus), "--vocab_size", "2000", "--out", str(folder), *extra])
        assert e.value.code == 2
        assert (f"--out {folder}: holds a model (model.safetensors) beside its tokenizer (tokenizer.json, vocab.txt); "
                f"its embeddings were trained on that tokenizer's ids") in capsys.readouterr().err
    assert tree_digest(folder) == before
    bare = _hf_folder(tmp_path / "bare", bert_mlm)  # weights without a tokenizer: one written there reads as theirs
    with pytest.raises(SystemExit):
        main(["train", "--input", str(small_corpus), "--vocab_size", "2000", "--out", str(bare)])
    assert (f"--out {bare}: holds a model (model.safetensors); a tokenizer there would be taken for the one its "
            f"embeddings were trained on; pick a new directory") in capsys.readouterr().err
    assert sorted(p.name for p in bare.iterdir()) == ["config.json", "model.safetensors"]


def test_modernbert_folder_with_an_odd_local_window_is_read_as_transformers_computes_it(tmp_path):
    """transformers attends local_attention // 2 tokens each side, so a folder with local_attention 7 computes
    the window of 6; it was refused ("local_attention (7) must be even"), a fix its user cannot make."""
    from trainer.export import build_ours, load_source, ours_outputs

    torch.manual_seed(0)
    hf = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(
        vocab_size=2000, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, local_attention=7, global_attn_every_n_layers=2, pad_token_id=0)).eval()
    folder = _hf_folder(tmp_path / "hf", hf)
    assert load_config(folder).local_attention == 6
    ids = torch.randint(6, 2000, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    _, logits = ours_outputs(build_ours(load_source(folder)), ids, mask)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
    assert (logits - want)[mask.bool()].abs().max() < 1e-5
