"""The static decode path's pieces that need no GPU: the graph-vs-eager check on bf16-like logits, disabled
buckets (logged, counted, exported as a metric), and the block table that copies only what changed."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from internvl_engine import LLM, SamplingParams
from internvl_engine.worker.cuda_graphs import graph_disagreement

from golden_utils import MODELS, checkpoint


def bf16_logits(rows: int = 4, hidden: int = 256, vocab: int = 2000, seed: int = 0):
    """The LM head of a bf16 model computed twice: in float32 from bf16 inputs (one summation order) and in bf16
    (another, rounded): what an eager step and its graph may give when cuBLAS picks other kernels."""
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, hidden, generator=gen) * 2).to(torch.bfloat16)
    w = (torch.randn(hidden, vocab, generator=gen) / hidden ** 0.5 * 3).to(torch.bfloat16)
    return (h.float() @ w.float()), (h @ w).float()


def test_bf16_rounding_differences_pass_the_dtype_scaled_check():
    eager, graph = bf16_logits()
    assert not torch.equal(eager, graph)
    assert not torch.allclose(graph, eager, rtol=1e-3, atol=1e-3)  # the old check would leave this bucket eager
    assert graph_disagreement(graph, eager, torch.bfloat16) is None
    assert "exceeds" in graph_disagreement(graph, eager, torch.float32)  # a float32 model has no such excuse
    assert graph_disagreement(eager.clone(), eager, torch.float32) is None


def test_a_wrong_graph_is_rejected_with_the_reason():
    eager, graph = bf16_logits(seed=1)
    wrong = graph.roll(1, dims=0)  # every row got another request's logits
    reason = graph_disagreement(wrong, eager, torch.bfloat16)
    assert reason is not None and "exceeds" in reason and "bfloat16" in reason
    shifted = graph.clone()
    shifted[2, 7] += 0.2 * eager[2].abs().max()  # one logit off by 20% of the row's scale
    assert graph_disagreement(shifted, eager, torch.bfloat16) is not None
    nan = graph.clone()
    nan[0, 3] = float("nan")
    assert "non-finite" in graph_disagreement(nan, eager, torch.bfloat16)
    masked = eager.clone()
    masked[:, :10] = float("-inf")  # the same non-finite entries in both: compared on the rest
    assert graph_disagreement(masked + (graph - eager), masked, torch.bfloat16) is None
    assert "shape" in graph_disagreement(graph[:3], eager, torch.bfloat16)


def test_within_tolerance_the_argmax_only_moves_between_near_ties():
    eager, graph = bf16_logits(seed=2)
    assert graph_disagreement(graph, eager, torch.bfloat16) is None
    top = eager.topk(2, dim=-1).values
    changed = graph.argmax(-1) != eager.argmax(-1)
    tolerance = 1e-3 + 8 * torch.finfo(torch.bfloat16).eps * eager.abs().amax(-1)
    assert ((top[:, 0] - top[:, 1])[changed] <= 2 * tolerance[changed]).all()


def static_llm(**options) -> LLM:
    return LLM(checkpoint(MODELS[0]), dtype=torch.float32, device="cpu", backend="torch", static_decode=True,
               **options)


def test_a_disabled_bucket_is_logged_counted_and_exported(caplog):
    from internvl_engine.server.metrics import ServerMetrics

    llm = static_llm(max_num_seqs=4)
    graphs = llm.runner.decode_graphs
    assert graphs.disabled_buckets == {}
    with caplog.at_level(logging.WARNING, logger="internvl_engine.worker.cuda_graphs"):
        graphs.disable(2, "max |graph - eager| 3 exceeds 0.1")
    assert graphs.disabled_buckets == {2: "max |graph - eager| 3 exceeds 0.1"}
    assert "bucket 2 disabled" in caplog.text and "exceeds 0.1" in caplog.text
    engine = SimpleNamespace(llm=llm, num_waiting=0, num_running=0, num_unfinished=0, num_preprocessing=0,
                             num_step_errors=0)
    text = ServerMetrics(engine, "tiny").render().decode()
    assert 'internvl_decode_graph_buckets_disabled{model_name="tiny"} 1.0' in text
    tokens = llm.generate(["Hello, who are you?", "Tell me a story."], SamplingParams(max_tokens=4, temperature=0))
    assert all(output.error is None for output in tokens)  # the bucket runs eagerly


class TableSpy:
    """Records each static step's block lists and how many table entries it copied."""

    def __init__(self, graphs) -> None:
        self.graphs, self.update = graphs, graphs._table_updates
        self.steps: list[tuple[list[list[int]], int, int]] = []  # (tables, bucket, entries copied)
        graphs._table_updates = self

    def __call__(self, tables, bucket):
        result = self.update(tables, bucket)
        self.steps.append(([list(blocks) for blocks in tables], bucket, len(result[0])))  # the lists grow later
        return result


def test_the_static_table_copies_only_new_blocks_and_holds_every_requests_table():
    llm = static_llm(max_num_seqs=4, block_size=4)
    graphs = llm.runner.decode_graphs
    spy = TableSpy(graphs)
    prompts = ["Hello, who are you?", "Tell me a story.", "Why is the sky blue?"]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (12, 20, 6)]
    for prompt, param in zip(prompts, params):
        llm.add_request(prompt, param)
    while llm.scheduler.has_unfinished():
        steps = len(spy.steps)
        llm.step()
        if len(spy.steps) == steps:
            continue  # a prefill step: the dynamic path
        tables, bucket, _ = spy.steps[-1]
        for row, blocks in enumerate(tables):
            assert graphs.tables[row, : len(blocks)].tolist() == blocks
        for row in range(len(tables), bucket):
            assert int(graphs.tables[row, 0]) == graphs.scratch_block  # padding rows read the scratch block
    copied = [entries for _, _, entries in spy.steps]
    held = [sum(len(blocks) for blocks in tables) for tables, _, _ in spy.steps]
    assert copied[0] == held[0]  # the first static step writes every row
    assert sum(copied[1:]) < sum(held[1:]) / 2  # later steps mostly copy nothing (a new block every 4 tokens)
    assert any(entries == 0 for entries in copied)


def test_a_replaced_or_shrunk_block_list_is_rewritten_whole():
    graphs = static_llm(max_num_seqs=4).runner.decode_graphs
    width, scratch = graphs.tables.shape[1], graphs.scratch_block

    def apply(tables, bucket):
        index, blocks, lists, lengths = graphs._table_updates(tables, bucket)
        graphs.tables.view(-1)[torch.tensor(index, dtype=torch.long)] = torch.tensor(blocks, dtype=torch.int32)
        graphs._row_lists[:bucket], graphs._row_lengths[:bucket] = lists, lengths
        return index

    first, second = [3, 4], [7]
    assert apply([first, second], 2) == [0, 1, width]
    first.append(5)
    assert apply([first, second], 2) == [2]  # only the appended block
    assert apply([[3, 4, 5], second], 2) == [0, 1, 2]  # the same blocks in a new list: the whole row
    shrunk = [8, 9, 10]
    apply([shrunk, second], 2)
    del shrunk[1:]
    shrunk.append(11)
    assert apply([shrunk, second], 2) == [0, 1]  # shorter than what was copied: the whole row again
    assert apply([shrunk], 4) == [width]  # row 1 becomes a padding row; rows 2-3 were padding already
    assert graphs.tables[1, 0] == scratch and graphs.tables[0, :2].tolist() == [8, 11]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA graphs")
def test_capture_at_startup_can_be_skipped():
    llm = LLM(checkpoint(MODELS[0]), dtype=torch.bfloat16, device="cuda", capture_graphs_at_startup=False,
              max_num_seqs=4)
    graphs = llm.runner.decode_graphs
    assert graphs.use_graphs and graphs.graphs == {}
    llm.generate(["Hello, who are you?"], SamplingParams(max_tokens=4, temperature=0))
    assert set(graphs.graphs) | set(graphs.disabled_buckets) == {1}  # captured when first needed
    assert graphs.disabled_buckets == {}, graphs.disabled_buckets
