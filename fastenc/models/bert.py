"""from_pretrained_bert: a TransformerEncoderModel with the weights of a Hugging Face BERT checkpoint folder.

Reads config.json and model.safetensors directly (json + safetensors; transformers is not needed). BERT is a
post-norm encoder with exact GELU: embeddings (word + absolute position + token type) -> LayerNorm -> layers whose
attention output and feed-forward output each end in residual add + LayerNorm. Inputs are one segment, so token
type 0 is added everywhere.
"""

from __future__ import annotations

import json
import os

import torch

from fastenc.models.transformer import TransformerEncoderModel


def _read_config(path: str) -> dict:
    config_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"BERT checkpoint folder {path!r} does not exist "
                                "(expected a folder with config.json and model.safetensors)")
    for name in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{name} is missing in {path!r} (a BERT checkpoint folder needs config.json "
                                    "and model.safetensors)")
    with open(config_file) as f:
        config = json.load(f)
    if config.get("model_type") != "bert":
        raise ValueError(f"{config_file} describes model_type {config.get('model_type')!r}; expected 'bert'")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{config_file} has hidden_act {config['hidden_act']!r}; only 'gelu' (exact) is supported")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{config_file} has position_embedding_type {config['position_embedding_type']!r}; "
                         "only 'absolute' is supported")
    return config


def _bert_state_dict(weights: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Hugging Face BERT names -> TransformerEncoderModel names; q, k and v are stacked into one in_proj."""
    # Checkpoints saved from BertModel have no prefix; those from BertFor* heads have "bert.".
    prefix = "bert." if any(k.startswith("bert.") for k in weights) else ""

    def take(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in weights:
            raise KeyError(f"model.safetensors has no tensor {key!r}; is this a BERT checkpoint?")
        return weights[key]

    state = {
        "embeddings.tokens.weight": take("embeddings.word_embeddings.weight"),
        "embeddings.positions.weight": take("embeddings.position_embeddings.weight"),
        "embeddings.token_types.weight": take("embeddings.token_type_embeddings.weight"),
        "embeddings.norm.weight": take("embeddings.LayerNorm.weight"),
        "embeddings.norm.bias": take("embeddings.LayerNorm.bias"),
    }
    for i in range(num_layers):
        src, dst = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            state[dst + f"self_attn.in_proj_{kind}"] = torch.cat(
                [take(src + f"attention.self.{p}.{kind}") for p in ("query", "key", "value")])
            state[dst + f"self_attn.out_proj.{kind}"] = take(src + f"attention.output.dense.{kind}")
            state[dst + f"norm1.{kind}"] = take(src + f"attention.output.LayerNorm.{kind}")
            state[dst + f"linear1.{kind}"] = take(src + f"intermediate.dense.{kind}")
            state[dst + f"linear2.{kind}"] = take(src + f"output.dense.{kind}")
            state[dst + f"norm2.{kind}"] = take(src + f"output.LayerNorm.{kind}")
    return state


def from_pretrained_bert(path: str | os.PathLike, num_classes: int | None = None, pooling: str = "cls",
                         dropout: float | None = None) -> TransformerEncoderModel:
    """A TransformerEncoderModel holding the BERT checkpoint in folder `path` (e.g. all-MiniLM-L6-v2).

    Its hidden_states equal BertModel's last_hidden_state at non-pad tokens. num_classes adds a new (randomly
    initialised) classification head; dropout defaults to the checkpoint's hidden_dropout_prob.
    """
    from safetensors.torch import load_file  # an optional dependency, needed for this loader only

    path = os.fspath(path)
    config = _read_config(path)
    model = TransformerEncoderModel(
        vocab_size=config["vocab_size"], d_model=config["hidden_size"], nhead=config["num_attention_heads"],
        num_layers=config["num_hidden_layers"], dim_feedforward=config["intermediate_size"],
        dropout=config.get("hidden_dropout_prob", 0.1) if dropout is None else dropout,
        max_len=config["max_position_embeddings"], positions="learned", pooling=pooling, num_classes=num_classes,
        pad_id=config.get("pad_token_id", 0), activation="gelu", layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        embedding_norm=True, type_vocab_size=config.get("type_vocab_size", 2),
    )
    state = _bert_state_dict(load_file(os.path.join(path, "model.safetensors")), config["num_hidden_layers"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Only the new head may be missing; the mapping above covers every encoder parameter.
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    return model
