"""torch.compile(dynamic=True) sees the blocked layout's sizes as simple expressions of the length.

Dynamo hands a symbolic length to Python as an int, so `max(1, ...)` or `min(g, nb)` in the layout's arithmetic
would put Max/Min terms into every size and index of the graph; inductor then cannot simplify its index arithmetic
and emits scalar gathers and copies (the compiled 1k forward was slower than eager). Traced with the cheap "eager"
backend: the check is on dynamo's graph, not on inductor's code."""

from __future__ import annotations

import torch

from bigbird_ja.configuration import BigBirdJaConfig
from bigbird_ja.modeling import BigBirdJaModel


def test_dynamic_compile_keeps_the_layout_sizes_free_of_min_and_max():
    torch.manual_seed(0)
    config = BigBirdJaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=512, block_size=16,
                             attention_backend="blocked")
    model = BigBirdJaModel(config).eval()
    sizes = []

    def backend(gm, example_inputs):  # dynamo's graph as it is, run uncompiled
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor):
                sizes.extend(str(s) for s in value.shape)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True, backend=backend)
    with torch.no_grad():
        for length in (80, 203):
            ids = torch.randint(5, 100, (2, length), generator=torch.Generator().manual_seed(length))
            assert torch.allclose(compiled(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state,
                                  atol=1e-5)
    symbolic = sorted({s for s in sizes if not s.isdigit()})
    print(symbolic)
    assert symbolic, "the length was not traced as a symbol: the test checks nothing"
    assert not [s for s in symbolic if "Max" in s or "Min" in s], symbolic
