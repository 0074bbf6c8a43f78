import torch

from loom.techniques.doc_meta import document_metadata


def _loop_positions(tokens, eos):
    s, b = tokens.shape
    pos = torch.zeros(s, b, dtype=torch.long)
    for j in range(b):
        for t in range(1, s):
            pos[t, j] = 0 if tokens[t - 1, j] == eos else pos[t - 1, j] + 1
    return pos


def test_matches_loop_and_is_consistent():
    tokens = torch.randint(0, 4, (97, 3))
    meta = document_metadata(tokens, eos_id=0)
    assert torch.equal(meta.pos, _loop_positions(tokens, 0))
    assert torch.equal(meta.start, meta.pos == 0)
    assert torch.equal(meta.doc, meta.start.long().cumsum(0))
    assert meta.pos.dtype == torch.long and meta.doc.dtype == torch.long and meta.start.dtype == torch.bool


def test_eos_ends_document_and_none_means_single_document():
    tokens = torch.tensor([[5], [0], [7], [8], [0]])
    meta = document_metadata(tokens, eos_id=0)
    assert meta.pos[:, 0].tolist() == [0, 1, 0, 1, 2]
    assert meta.doc[:, 0].tolist() == [1, 1, 2, 2, 2]
    assert document_metadata(tokens, eos_id=None).pos[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_positions_restart_where_documents_start():
    """The three tensors agree with each other: pos restarts at 0 exactly where start is set (Megatron's
    reset_position_ids), and doc counts the starts."""
    tokens = torch.randint(0, 4, (50, 2))
    meta = document_metadata(tokens, eos_id=0)
    assert torch.equal(meta.pos == 0, meta.start)
    assert torch.equal(meta.doc, meta.start.long().cumsum(0))
