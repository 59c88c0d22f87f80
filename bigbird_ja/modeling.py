"""BigBird-ja: a DeBERTa-v2 encoder whose self-attention runs on the BigBird block layout.

Parameter names follow transformers' DeBERTa-v2 (`embeddings.*`, `encoder.layer.N.attention.self.query_proj`, ...),
with `bigbird_ja.` as the base-model prefix, so warm starts are a prefix rename (see `convert.py`).

Shapes: B batch, N tokens, E hidden size, H heads, D head dim, S relative span (2S relative embeddings).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils.generic import can_return_tuple

from .attention import (HashedDropout, RelativePositionSpec, disentangled_attention, layout_for, num_blocks_for,
                        workspace_scope)
from .attention.workspace import ReusePool, pool_for
from .configuration import BigBirdJaConfig


class _PooledEmbeddingLookup(torch.autograd.Function):
    """weight[ids] whose weight gradient (zeros, then every position's row added, as torch's own CPU embedding
    backward does) comes from eager training's pool: the word embeddings' gradient is the largest tensor of a step
    (vocabulary x width: 98 MB at 32k x 768), and with `zero_grad(set_to_none=True)` a fresh one is mapped, faulted
    in and zeroed by the kernel every step (about 5% of a 1k-token step of 2 base layers on 2 cores). Autograd takes
    the buffer as the parameter's .grad without a copy; once the gradient is set to None the pool hands it out
    again. (A tied decoder's gradient is summed into a tensor of its own: no gain there.)"""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx: int | None, pool: ReusePool):
        ctx.save_for_backward(ids)
        ctx.weight_shape, ctx.padding_idx, ctx.pool = weight.shape, padding_idx, pool
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: torch's own backward, which autograd can differentiate
            padding_idx = -1 if ctx.padding_idx is None else ctx.padding_idx
            return None, torch.ops.aten.embedding_backward(grad, ids, ctx.weight_shape[0], padding_idx, False,
                                                           False), None, None
        # torch's steps written out: aten's embedding_dense_backward.out is generated from the functional op, so it
        # would allocate a whole fresh gradient and copy it into the pooled buffer (profiled: a 94 MB empty + copy_)
        grad_weight = ctx.pool.empty(ctx.weight_shape, grad).zero_()
        grad_weight.index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]))
        if ctx.padding_idx is not None:  # the padding row takes no gradient, as with F.embedding
            grad_weight[ctx.padding_idx] = 0
        return None, grad_weight, None, None


def embedding_lookup(embedding: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """embedding(ids), its weight gradient from eager CPU training's pool where the plain embedding's options allow
    (`_PooledEmbeddingLookup`)."""
    weight = embedding.weight
    pool = pool_for(weight, torch.compiler.is_compiling() or torch.jit.is_tracing())  # traced: export, ONNX, compile
    if (pool is None or not weight.requires_grad or embedding.max_norm is not None or embedding.scale_grad_by_freq
            or embedding.sparse):
        return embedding(ids)
    # nn.Embedding has already made a negative padding_idx positive
    return _PooledEmbeddingLookup.apply(ids, weight, embedding.padding_idx, pool)


class BigBirdJaEmbeddings(nn.Module):
    """Word (+ absolute position if position_biased_input) (+ token type) embeddings, projection, LayerNorm."""

    def __init__(self, config: BigBirdJaConfig):
        super().__init__()
        self.embedding_size = config.embedding_size
        self.word_embeddings = nn.Embedding(config.vocab_size, self.embedding_size, padding_idx=config.pad_token_id)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, self.embedding_size) if config.position_biased_input else None
        )
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, self.embedding_size) if config.type_vocab_size > 0 else None
        )
        self.embed_proj = (
            nn.Linear(self.embedding_size, config.hidden_size, bias=False)
            if self.embedding_size != config.hidden_size else None
        )
        self.LayerNorm = nn.LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.dropout = HashedDropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids, mask, inputs_embeds):
        embeddings = embedding_lookup(self.word_embeddings, input_ids) if inputs_embeds is None else inputs_embeds
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(embeddings.shape[1], device=embeddings.device)[None]
            embeddings = embeddings + self.position_embeddings(position_ids.long())
        if self.token_type_embeddings is not None:
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        if self.embed_proj is not None:
            embeddings = self.embed_proj(embeddings)
        embeddings = self.LayerNorm(embeddings)
        embeddings = embeddings * mask.unsqueeze(-1).to(embeddings.dtype)  # padding starts as zeros, as in DeBERTa
        return self.dropout(embeddings)


class BigBirdJaSelfAttention(nn.Module):
    """Projections of the disentangled attention; the op itself is `attention.disentangled_attention`."""

    def __init__(self, config: BigBirdJaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_size = config.attention_head_size
        all_head = self.num_heads * self.head_size
        self.query_proj = nn.Linear(config.hidden_size, all_head)
        self.key_proj = nn.Linear(config.hidden_size, all_head)
        self.value_proj = nn.Linear(config.hidden_size, all_head)
        self.pos_att_type = list(config.pos_att_type) if config.relative_attention else []
        if config.relative_attention and not config.share_att_key:
            if "c2p" in self.pos_att_type:
                self.pos_key_proj = nn.Linear(config.hidden_size, all_head)
            if "p2c" in self.pos_att_type:
                self.pos_query_proj = nn.Linear(config.hidden_size, all_head)
        self.pos_dropout = HashedDropout(config.hidden_dropout_prob)
        # DeBERTa counts the configured relative terms in the scale even when relative attention is off.
        scale_factor = 1 + sum(t in config.pos_att_type for t in ("c2p", "p2c"))
        self.scale = 1.0 / math.sqrt(self.head_size * scale_factor)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[..., M, H*D] -> [..., H, M, D]"""
        return x.unflatten(-1, (self.num_heads, self.head_size)).transpose(-2, -3)

    def forward(self, hidden_states, key_padding_mask, layout, rel_embeddings):
        q = self._heads(self.query_proj(hidden_states))  # [B, H, N, D]
        k = self._heads(self.key_proj(hidden_states))
        v = self._heads(self.value_proj(hidden_states))
        pos_key = pos_query = rel_spec = None
        if self.pos_att_type:
            rel_spec = RelativePositionSpec.from_config(self.config)
            rel = self.pos_dropout(rel_embeddings[: 2 * rel_spec.span])  # [2S, E]
            if "c2p" in self.pos_att_type:
                proj = self.key_proj if self.config.share_att_key else self.pos_key_proj
                pos_key = self._heads(proj(rel))  # [H, 2S, D]
            if "p2c" in self.pos_att_type:
                proj = self.query_proj if self.config.share_att_key else self.pos_query_proj
                pos_query = self._heads(proj(rel))
        context = disentangled_attention(
            q, k, v, layout, key_padding_mask, self.scale, pos_key=pos_key, pos_query=pos_query, rel_spec=rel_spec,
            dropout_p=self.config.attention_probs_dropout_prob, training=self.training,
            backend=self.config.attention_backend,
        )  # [B, H, N, D]
        return context.transpose(1, 2).flatten(2)  # [B, N, E]


class BigBirdJaSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.dropout = HashedDropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BigBirdJaAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self = BigBirdJaSelfAttention(config, layer_idx)
        self.output = BigBirdJaSelfOutput(config)

    def forward(self, hidden_states, key_padding_mask, layout, rel_embeddings):
        return self.output(self.self(hidden_states, key_padding_mask, layout, rel_embeddings), hidden_states)


class BigBirdJaIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class BigBirdJaOutput(BigBirdJaSelfOutput):
    def __init__(self, config):
        super().__init__(config)
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class BigBirdJaLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attention = BigBirdJaAttention(config, layer_idx)
        self.intermediate = BigBirdJaIntermediate(config)
        self.output = BigBirdJaOutput(config)

    def forward(self, hidden_states, key_padding_mask, layout, rel_embeddings):
        attention_output = self.attention(hidden_states, key_padding_mask, layout, rel_embeddings)
        return self.output(self.intermediate(attention_output), attention_output)


class BigBirdJaConvLayer(nn.Module):
    """DeBERTa-v2's optional convolution added to the output of the first layer (conv_kernel_size > 0)."""

    def __init__(self, config):
        super().__init__()
        self.conv_act = config.conv_act
        kernel = config.conv_kernel_size
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, kernel, padding=(kernel - 1) // 2,
                              groups=config.conv_groups)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.dropout = HashedDropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, residual_states, mask):
        out = self.conv(hidden_states.transpose(1, 2)).transpose(1, 2)
        out = out.masked_fill(~mask.bool().unsqueeze(-1), 0)
        out = ACT2FN[self.conv_act](self.dropout(out))
        return self.LayerNorm(residual_states + out) * mask.unsqueeze(-1).to(out.dtype)


def _first_tokens(hidden_states: torch.Tensor, n) -> torch.Tensor:
    # A fresh contiguous copy, not a view (or a clone of one): whether a view is contiguous depends on n, which a
    # traced graph must not ask (it would specialise on n being a multiple of the block size, or on batch 1).
    return hidden_states.index_select(1, torch.arange(n, device=hidden_states.device))


class BigBirdJaEncoder(nn.Module):
    def __init__(self, config: BigBirdJaConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([BigBirdJaLayer(config, i) for i in range(config.num_hidden_layers)])
        if config.relative_attention:
            self.rel_embeddings = nn.Embedding(2 * config.relative_span, config.hidden_size)
        self.norm_rel_ebd = [x.strip() for x in config.norm_rel_ebd.lower().split("|")]
        if config.relative_attention and "layer_norm" in self.norm_rel_ebd:
            self.LayerNorm = nn.LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.conv = BigBirdJaConvLayer(config) if config.conv_kernel_size > 0 else None
        self.gradient_checkpointing = False

    def get_rel_embedding(self):
        if not self.config.relative_attention:
            return None
        rel = self.rel_embeddings.weight
        return self.LayerNorm(rel) if "layer_norm" in self.norm_rel_ebd else rel

    def forward(self, hidden_states, mask, output_hidden_states=False):
        N = hidden_states.shape[1]
        # Pad once to whole blocks, as padding tokens (zeros, never attended): every layer then works on whole
        # blocks, and a traced graph (torch.export, ONNX, torch.compile) has no branch on whether N is a multiple
        # of the block size. The outputs of the real tokens are those of the unpadded input (batch invariance).
        padded = num_blocks_for(N, self.config.block_size) * self.config.block_size
        hidden_states = F.pad(hidden_states, (0, 0, 0, padded - N))
        mask = F.pad(mask, (0, padded - N), value=False)
        rel_embeddings = self.get_rel_embedding()
        if torch.compiler.is_compiling():  # a traced graph takes no scratch buffers
            hidden_states, all_hidden = self._layers(hidden_states, mask, rel_embeddings, padded, output_hidden_states)
        else:
            with workspace_scope():  # the CPU scratch buffers of the layers' no-gradient attention, freed after
                hidden_states, all_hidden = self._layers(hidden_states, mask, rel_embeddings, padded,
                                                         output_hidden_states)
        if output_hidden_states:
            all_hidden = tuple(_first_tokens(h, N) for h in all_hidden)
        return _first_tokens(hidden_states, N), all_hidden

    def _layers(self, hidden_states, mask, rel_embeddings, padded: int, output_hidden_states: bool):
        all_hidden = (hidden_states,) if output_hidden_states else None
        embedding_output = hidden_states
        for i, layer in enumerate(self.layer):
            layout = layout_for(self.config, i, padded)
            hidden_states = layer(hidden_states, mask, layout, rel_embeddings)
            if i == 0 and self.conv is not None:
                hidden_states = self.conv(embedding_output, hidden_states, mask)
            if output_hidden_states:
                all_hidden = all_hidden + (hidden_states,)
        return hidden_states, all_hidden


class BigBirdJaPreTrainedModel(PreTrainedModel):
    config: BigBirdJaConfig
    config_class = BigBirdJaConfig
    base_model_prefix = "bigbird_ja"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BigBirdJaLayer"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, verify_checksums: bool = True, **kwargs):
        """transformers' `from_pretrained`, a local folder first checked against its checksums.json (`bigbird-ja
        export`, `finetune` and `convert` write one last): a damaged file is a `DamagedFolderError` (a ValueError)
        naming it, before any weight is read. A folder without one (`save_pretrained`'s, another tool's) and a Hub
        id load as before. verify_checksums=False skips the check, for a caller that has just made it itself."""
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            folder = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
            if verify_checksums and folder.is_dir():
                from .common.checksums import verify_model_folder

                verify_model_folder(folder)
            if (folder / "config.json").is_file():
                kwargs = _keep_function_at_new_length(folder, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def extend_length(self, max_position_embeddings: int):
        """Let the model read inputs of up to ``max_position_embeddings`` tokens without changing what it computes
        on the inputs it already handled (the relative-position range and the span random blocks are drawn over
        stay those of its old length; see `BigBirdJaConfig`). Returns the model; save it with save_pretrained.
        Refused for absolute position embeddings (position_biased_input), which a new length would leave untrained."""
        from .configuration import lengthen_values

        config = self.config
        if not isinstance(max_position_embeddings, int) or max_position_embeddings < 1:
            raise ValueError(f"extend_length({max_position_embeddings!r}): give a positive number of tokens")
        pinned = lengthen_values(config.to_dict() | {"max_position_embeddings": config.max_position_embeddings},
                                 {"max_position_embeddings": max_position_embeddings}, where="this model")
        before = {key: getattr(config, key) for key in pinned}
        for key, value in pinned.items():
            setattr(config, key, value)
        try:
            config.validate_bigbird_ja()
        except ValueError:
            for key, value in before.items():
                setattr(config, key, value)
            raise
        return self

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, BigBirdJaLMPredictionHead):
            with torch.no_grad():
                module.bias.zero_()


def _keep_function_at_new_length(folder: Path, kwargs: dict) -> dict:
    """The load-time check of `from_pretrained(folder, max_position_embeddings=n)` (or a config whose length differs
    from the folder's): the length-defined fields the folder's config.json leaves unset (saved before they were
    written resolved) are pinned to its length, so the loaded model computes what the saved one did on the inputs
    it handled. A config given with another explicit value is the caller's choice: warned about, with the fix."""
    import copy
    import json
    import warnings

    from .configuration import LENGTH_DEFINED_FIELDS, lengthen_values, resolve_length_fields

    saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if saved.get("model_type") != BigBirdJaConfig.model_type:
        return kwargs
    given = kwargs.get("config")
    if not isinstance(given, BigBirdJaConfig):
        if "max_position_embeddings" in kwargs:
            kwargs = {**kwargs, **lengthen_values(saved, {key: kwargs[key] for key in
                                                          (*LENGTH_DEFINED_FIELDS, "max_position_embeddings")
                                                          if key in kwargs}, where=str(folder))}
        return kwargs
    new = given.max_position_embeddings
    if new == saved.get("max_position_embeddings", BigBirdJaConfig.max_position_embeddings):
        return kwargs
    pins = lengthen_values(saved, {"max_position_embeddings": new}, where=str(folder))
    resolved = resolve_length_fields(saved)
    config, changed = given, []
    for key in LENGTH_DEFINED_FIELDS:
        if key not in pins:
            continue
        value = getattr(given, key)
        unset = value is None or (key == "max_relative_positions" and value < 1)
        if unset and (saved.get(key) is None or (key == "max_relative_positions" and saved[key] < 1)):
            if config is given:
                config = copy.deepcopy(given)
            setattr(config, key, pins[key])
        elif (resolve_length_fields(given.to_dict())[key] if unset else value) != resolved[key]:
            changed.append(f"{key}={value} (saved: {resolved[key]})")
    if changed:
        warnings.warn(f"loading {folder} at max_position_embeddings={new} with {', '.join(changed)}: the model will "
                      f"compute something else than the saved one on the inputs it handled. To keep its function, "
                      f"leave these fields as saved ({', '.join(f'{k}={resolved[k]}' for k in LENGTH_DEFINED_FIELDS)})",
                      stacklevel=3)
    return kwargs if config is given else {**kwargs, "config": config}


def _check_inputs(config, input_ids, inputs_embeds, attention_mask):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds.")
    shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
    if len(shape) != 2:
        raise ValueError(f"input_ids must be [batch, seq_len]; got shape {tuple(shape)}.")
    if shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"sequence length {shape[1]} exceeds max_position_embeddings={config.max_position_embeddings}; truncate "
            "or window the input (e.g. the tokenizer's max_length / stride), or lengthen the model "
            "(model.extend_length(n), or `bigbird-ja convert FOLDER NEW_FOLDER --max-length n`).")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask must be [batch, seq_len] = {list(shape)} (1 = token, 0 = padding); got "
                         f"{tuple(attention_mask.shape)}. 3-D/4-D masks are not taken: the layout comes from the config.")
    return shape


def _known_keywords_only(forward):
    """An unknown keyword argument to `forward` is a `TypeError` that names every unknown one (and the argument a
    misspelt one was probably meant to be), instead of being swallowed by `**kwargs`: `attention_maks=` would leave
    the padding attended to, `head_mask=` would be silently ignored.

    The forwards take no `**kwargs`. `return_dict` is `@can_return_tuple`'s (it is removed before the call), and
    transformers' Trainer passes `num_items_in_batch` only to a forward with `**kwargs`, trusting such a model to
    divide its loss by it (and no longer dividing by the gradient-accumulation steps itself); these models average
    their losses over the batch, so they must not look as if they took it.
    """
    names = [name for name in inspect.signature(forward).parameters if name != "self"]

    @functools.wraps(forward)
    def checked(self, *args, **kwargs):
        unknown = [key for key in kwargs if key not in names]
        if unknown:
            described = []
            for key in unknown:
                close = difflib.get_close_matches(key, names, n=1, cutoff=0.8)
                described.append(repr(key) + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(f"{type(self).__name__}.forward() got unexpected keyword argument"
                            f"{'s' if len(unknown) > 1 else ''} {', '.join(described)}; it takes {', '.join(names)} "
                            f"and return_dict")
        return forward(self, *args, **kwargs)

    return checked


class BigBirdJaModel(BigBirdJaPreTrainedModel):
    """The encoder. Every forward returns a `BaseModelOutput`; `@can_return_tuple` turns it into a tuple (its
    fields in order, None left out) when return_dict=False is passed or set in the config, here and in the heads."""

    def __init__(self, config: BigBirdJaConfig):
        # The config validated itself when it was constructed, but transformers validates only its own fields on
        # assignment, so `config.block_size = 12` afterwards goes unseen: check once more before building on it.
        config.validate_bigbird_ja()
        super().__init__(config)
        self.embeddings = BigBirdJaEmbeddings(config)
        self.encoder = BigBirdJaEncoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    @can_return_tuple
    @_known_keywords_only
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_attentions=None, output_hidden_states=None) -> BaseModelOutput:
        if output_attentions:
            raise ValueError("output_attentions is not available for block-sparse attention (no N x N matrix is "
                             "formed); bigbird_ja.attention_mask(config, seq_len, layer) gives the pattern.")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        shape = _check_inputs(self.config, input_ids, inputs_embeds, attention_mask)
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        mask = torch.ones(shape, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        if token_type_ids is None:
            token_type_ids = torch.zeros(shape, dtype=torch.long, device=device)
        hidden = self.embeddings(input_ids, token_type_ids, position_ids, mask, inputs_embeds)
        last, all_hidden = self.encoder(hidden, mask, output_hidden_states=output_hidden_states)
        return BaseModelOutput(last_hidden_state=last, hidden_states=all_hidden)


class BigBirdJaPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class BigBirdJaLMPredictionHead(nn.Module):
    """transform -> decoder (weights tied to the word embeddings) + a per-token output bias."""

    def __init__(self, config):
        super().__init__()
        self.transform = BigBirdJaPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.embedding_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states)) + self.bias


class BigBirdJaOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BigBirdJaLMPredictionHead(config)

    def forward(self, sequence_output):
        return self.predictions(sequence_output)


class BigBirdJaForMaskedLM(BigBirdJaPreTrainedModel):
    _tied_weights_keys = {"cls.predictions.decoder.weight": "bigbird_ja.embeddings.word_embeddings.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.bigbird_ja = BigBirdJaModel(config)
        self.cls = BigBirdJaOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings

    @can_return_tuple
    @_known_keywords_only
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None):
        outputs = self.bigbird_ja(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                  position_ids=position_ids, inputs_embeds=inputs_embeds,
                                  output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                  return_dict=True)
        logits = self.cls(outputs.last_hidden_state)  # [B, N, V]
        loss = None
        if labels is not None:  # -100 = not predicted
            loss = CrossEntropyLoss()(logits.view(-1, self.config.vocab_size).float(), labels.view(-1))
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class ContextPooler(nn.Module):
    """DeBERTa's pooler: the first token's state, dropout, dense, activation."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.pooler_hidden_size, config.pooler_hidden_size)
        self.dropout = nn.Dropout(config.pooler_dropout)
        self.activation = ACT2FN[config.pooler_hidden_act]

    def forward(self, hidden_states):
        return self.activation(self.dense(self.dropout(hidden_states[:, 0])))


def _classifier_dropout(config):
    rate = getattr(config, "cls_dropout", None)
    return nn.Dropout(config.hidden_dropout_prob if rate is None else rate)


class BigBirdJaForSequenceClassification(BigBirdJaPreTrainedModel):
    """Classification or (num_labels == 1, or problem_type="regression") regression on the pooled first token."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bigbird_ja = BigBirdJaModel(config)
        self.pooler = ContextPooler(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.pooler_hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    @_known_keywords_only
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None):
        outputs = self.bigbird_ja(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                  position_ids=position_ids, inputs_embeds=inputs_embeds,
                                  output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                  return_dict=True)
        logits = self.classifier(self.dropout(self.pooler(outputs.last_hidden_state)))  # [B, num_labels]
        loss = None
        if labels is not None:
            problem = self.config.problem_type
            if problem is None:
                if self.num_labels == 1:
                    problem = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem = "single_label_classification"
                else:
                    problem = "multi_label_classification"
            if problem == "regression":
                loss = MSELoss()(logits.squeeze(-1).float(), labels.float().view(-1)) if self.num_labels == 1 \
                    else MSELoss()(logits.float(), labels.float())
            elif problem == "single_label_classification":
                loss = CrossEntropyLoss()(logits.view(-1, self.num_labels).float(), labels.view(-1))
            else:
                loss = BCEWithLogitsLoss()(logits.float(), labels.float())
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class BigBirdJaForMultipleChoice(BigBirdJaPreTrainedModel):
    """Inputs [B, C, N]: each choice encoded separately, scored from its pooled first token."""

    def __init__(self, config):
        super().__init__(config)
        self.bigbird_ja = BigBirdJaModel(config)
        self.pooler = ContextPooler(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.pooler_hidden_size, 1)
        self.post_init()

    @can_return_tuple
    @_known_keywords_only
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None):
        num_choices = (input_ids if input_ids is not None else inputs_embeds).shape[1]

        def flat(x):  # [B, C, ...] -> [B*C, ...]
            return None if x is None else x.reshape(-1, *x.shape[2:])

        outputs = self.bigbird_ja(flat(input_ids), attention_mask=flat(attention_mask),
                                  token_type_ids=flat(token_type_ids), position_ids=flat(position_ids),
                                  inputs_embeds=flat(inputs_embeds), output_attentions=output_attentions,
                                  output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(self.pooler(outputs.last_hidden_state))).view(-1, num_choices)
        loss = CrossEntropyLoss()(logits.float(), labels) if labels is not None else None
        return MultipleChoiceModelOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class BigBirdJaForTokenClassification(BigBirdJaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bigbird_ja = BigBirdJaModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    @_known_keywords_only
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None):
        outputs = self.bigbird_ja(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                  position_ids=position_ids, inputs_embeds=inputs_embeds,
                                  output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                  return_dict=True)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))  # [B, N, num_labels]
        loss = None
        if labels is not None:  # -100 = ignored
            loss = CrossEntropyLoss()(logits.view(-1, self.num_labels).float(), labels.view(-1))
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class BigBirdJaForQuestionAnswering(BigBirdJaPreTrainedModel):
    """Extractive QA: start and end logits per token (num_labels must be 2)."""

    def __init__(self, config):
        super().__init__(config)
        self.bigbird_ja = BigBirdJaModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    @_known_keywords_only
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_attentions=None,
                output_hidden_states=None):
        outputs = self.bigbird_ja(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                  position_ids=position_ids, inputs_embeds=inputs_embeds,
                                  output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                  return_dict=True)
        logits = self.qa_outputs(outputs.last_hidden_state)  # [B, N, 2]
        start_logits, end_logits = (x.squeeze(-1).contiguous() for x in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            # Positions outside the input (answer not in this window) are ignored.
            ignored = start_logits.shape[1]
            start_positions = start_positions.view(-1).clamp(0, ignored)
            end_positions = end_positions.view(-1).clamp(0, ignored)
            loss_fct = CrossEntropyLoss(ignore_index=ignored)
            loss = (loss_fct(start_logits.float(), start_positions) + loss_fct(end_logits.float(), end_positions)) / 2
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                            hidden_states=outputs.hidden_states)
