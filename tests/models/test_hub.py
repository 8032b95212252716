"""Reading checkpoints: every broken file or config is a clear error naming the file and the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastlm.models import BertConfig, BertForMaskedLM, GPTConfig, GPTLMHeadModel, T5Config

V = 31


@pytest.fixture
def saved(tmp_path):
    """A tiny BertForMaskedLM written to tmp_path; returns the directory."""
    torch.manual_seed(0)
    config = BertConfig.preset("bert-tiny", vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    BertForMaskedLM(config).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "cut, problem",
    [(lambda b: b[: len(b) // 2], "truncated"), (lambda b: b"not a safetensors file" * 4, "garbage")],
)
def test_unreadable_weights_name_the_file(saved, cut, problem):
    path = saved / "model.safetensors"
    path.write_bytes(cut(path.read_bytes()))
    with pytest.raises(ValueError, match=rf"{path}.* is not a readable safetensors file"):
        BertForMaskedLM.from_pretrained(saved)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"model_type": "bert", ', r"config.json is not valid JSON"),
        ("\xff\xfe", r"config.json is not valid JSON"),
        ('[{"model_type": "bert"}]', r"config.json must hold a JSON object, got a list"),
        ('{"model_type": "bert", "hidden_size": "128"}', r"config.json: BertConfig.hidden_size must be int, got '128'"),
        ('{"model_type": "bert", "hidden_size": 16.0}', r"config.json: .*BertConfig.hidden_size must be int, got 16.0"),
        ('{"model_type": "bert", "hidden_dropout_prob": true}', r"config.json: .*dropout_prob must be float, got True"),
        ('{"model_type": "bert", "num_hidden_layers": -1}', r"config.json: .*num_hidden_layers must be >= 0, got -1"),
        (
            '{"model_type": "bert", "num_attention_heads": 5}',
            r"config.json: BertConfig: hidden_size=768 is not a multiple of num_attention_heads=5",
        ),
        ('{"model_type": "bert", "hidden_act": "swish2"}', r"config.json: BertConfig.hidden_act='swish2': unsupported"),
        ('{"model_type": "bert", "problem_type": 3}', r"config.json: .*problem_type must be str or None, got 3"),
    ],
)
def test_bad_config_names_the_file_and_field(saved, text, message):
    (saved / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises((TypeError, ValueError), match=rf"{saved}/{message}"):
        BertForMaskedLM.from_pretrained(saved)


def test_sharded_index_errors(saved):
    weights = saved / "model.safetensors"
    weights.rename(saved / "shard-1.safetensors")
    index = saved / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": ["shard-1.safetensors"]}))
    with pytest.raises(ValueError, match=rf"{index} must map tensor names to shard files"):
        BertForMaskedLM.from_pretrained(saved)
    index.write_text(json.dumps({"weight_map": {"x": "shard-2.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="shard-2.safetensors does not exist"):
        BertForMaskedLM.from_pretrained(saved)


def test_non_finite_weights_are_refused(saved):
    model = BertForMaskedLM.from_pretrained(saved)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["bert.encoder.layer.0.output.dense.weight"][0, 0] = float("nan")
    save_file(state, saved / "model.safetensors")
    with pytest.raises(ValueError, match=r"bert.encoder.layer.0.output.dense.weight holds 1 non-finite value"):
        BertForMaskedLM.from_pretrained(saved)


def test_configs_check_their_field_types():
    with pytest.raises(TypeError, match="GPTConfig.n_embd must be int, got '128'"):
        GPTConfig(n_embd="128")
    with pytest.raises(TypeError, match="T5Config.num_decoder_layers must be int or None, got 2.5"):
        T5Config(num_decoder_layers=2.5)
    assert GPTConfig(layer_norm_epsilon=0).layer_norm_epsilon == 0  # an int is a valid float
    with pytest.raises(ValueError, match=r"GPTConfig: n_embd=768 is not a multiple of n_head=0 \(>= 1\)"):
        GPTConfig(n_head=0)
    with pytest.raises(ValueError, match="T5Config.feed_forward_proj='gated-foo': unsupported activation 'foo'"):
        T5Config(feed_forward_proj="gated-foo")
    with pytest.raises(ValueError, match=r"T5Config.decoder_start_token_id=32 is outside the vocabulary \[0, 32\)"):
        T5Config(vocab_size=32, decoder_start_token_id=32)
    with pytest.raises(ValueError, match=r"BertConfig.pad_token_id=-1 is outside the vocabulary \[0, 30522\)"):
        BertConfig(pad_token_id=-1)
    with pytest.raises(TypeError, match="GPTConfig.n_embd must be int, got '128'"):
        GPTLMHeadModel.config_class.preset("gpt2-tiny", n_embd="128")


def test_buffers_of_older_hf_checkpoints_are_ignored(saved, tmp_path):
    """Older HF versions saved BERT's position_ids and GPT-2's causal-mask buffers with the weights."""
    path = saved / "model.safetensors"
    weights = load_file(path)
    save_file({**weights, "bert.embeddings.position_ids": torch.arange(512)[None]}, path)
    BertForMaskedLM.from_pretrained(saved)
    gpt_dir = tmp_path / "gpt"
    GPTLMHeadModel(GPTConfig.preset("gpt2-tiny", vocab_size=V, n_embd=16, n_layer=1, n_positions=8)).save_pretrained(
        gpt_dir
    )
    weights = load_file(gpt_dir / "model.safetensors")
    buffers = {
        "transformer.h.0.attn.bias": torch.ones(8, 8, dtype=torch.bool).tril()[None, None],
        "transformer.h.0.attn.masked_bias": torch.tensor(-1e4),
    }
    save_file({**weights, **buffers}, gpt_dir / "model.safetensors")
    GPTLMHeadModel.from_pretrained(gpt_dir)


def test_integer_weights_are_refused(saved):
    model = BertForMaskedLM.from_pretrained(saved)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["cls.predictions.bias"] = state["cls.predictions.bias"].long()
    save_file(state, saved / "model.safetensors")
    message = r"cls.predictions.bias has dtype torch.int64 in the checkpoint, BertForMaskedLM holds torch.float32"
    with pytest.raises(ValueError, match=message):
        BertForMaskedLM.from_pretrained(saved)


def test_from_pretrained_returns_eval_mode_as_hugging_face_does(saved):
    """Inference right after loading must not run dropout: two calls give the same logits."""
    model = BertForMaskedLM.from_pretrained(saved, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    assert not model.training and not any(m.training for m in model.modules())
    ids = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
