"""The chapters' classic slips (issue 30, item 4): each slip in the preset's worked backward
is flagged at exactly its tensor, with a hint in the learner's words that names it, while the
tensors the backward wrote before it are still all-close; a correct backward gets no hint,
and an unrelated slip gets none of these."""

from __future__ import annotations

import pytest

from app.programs import presets

POOL_BACKWARD = """\
dr = torch.zeros_like(r).view(N, K, -1)
dr.scatter_add_(2, idx.view(N, K, -1), dpooled.view(N, K, -1))
dr = dr.view(N, K, H, W)"""
EVERYWHERE = (
    "dr = dpooled[:, :, :, None, :, None].expand(N, K, H // 2, 2, W // 2, 2).reshape(N, K, H, W)"
)
UNMASKED = """\
pu = F.softmax((q @ k.transpose(-2, -1)) * hs ** -0.5, dim=-1)
datt = pu * (dp - (pu * dp).sum(-1, keepdim=True))"""
MASK_KEPT = """\
datt = p * (dp - (p * dp).sum(-1, keepdim=True))
datt = datt + (mask == 0) * dp"""

# (preset, the worked line, the slip, the tensor it lands on, words its hint must have)
SLIPS = {
    "mask forgotten": (
        "gpt", "datt = p * (dp - (p * dp).sum(-1, keepdim=True))", UNMASKED, "att",
        ["masked positions", "-inf", "p = 0", "mask"],
    ),
    "mask not applied to the gradient": (
        "gpt", "datt = p * (dp - (p * dp).sum(-1, keepdim=True))", MASK_KEPT, "att",
        ["masked positions", "masked_fill(mask == 0, 0)"],
    ),
    "softmax's sum over the wrong axis": (
        "gpt", "(p * dp).sum(-1, keepdim=True)", "(p * dp).sum(-2, keepdim=True)", "att",
        ["summed over dim -2", "softmax over dim -1", ".sum(-1, keepdim=True)"],
    ),
    "attention scale dropped from dq": (
        "gpt", "dq = (datt @ k) * hs ** -0.5", "dq = datt @ k", "q",
        ["attention scale", "`hs ** -0.5` is missing", "2.828"],
    ),
    "attention scale dropped from dk": (
        "gpt", "dk = (datt.transpose(-2, -1) @ q) * hs ** -0.5",
        "dk = datt.transpose(-2, -1) @ q", "k", ["attention scale", "`hs ** -0.5` is missing"],
    ),
    "max-pool's gradient to every entry": (
        "conv", POOL_BACKWARD, EVERYWHERE, "r", ["all 4 of its entries", "max", "argmax"],
    ),
    "max-pool's gradient shared as avg-pool's": (
        "conv", POOL_BACKWARD, EVERYWHERE + " / 4", "r", ["equal shares", "avg-pool", "argmax"],
    ),
    "BPTT without the next step's gradient": (
        "rnn", "dh_t = dhs[:, t] + dhnext", "dh_t = dhs[:, t]", "Wxh",
        ["no gradient is carried", "step t + 1", "Whh.T", "dhnext"],
    ),
    "dWhh = where += sums the steps": (
        "rnn", "dWhh += prev[:, t].T @ dhraw", "dWhh = prev[:, t].T @ dhraw", "Whh",
        ["inside the loop over t", "sums the steps", "dWhh += ..."],
    ),
    "tied weights: the lookup's part forgotten": (
        "gpt", "dwte.index_add_(0, Xb.view(-1), dtok.view(B * T, C))", "", "wte",
        ["tied", "token embedding", "index_add_(0, Xb.view(-1), dtok.view(-1, 32))"],
    ),
    "tied weights: the head's part forgotten": (
        "gpt", "dwte = dlogits.view(B * T, V).T @ xf.view(B * T, C)",
        "dwte = torch.zeros_like(wte)", "wte",
        ["tied head", "logits = xf @ wte.T", "dwte += dlogits.view(-1, 27).T @ xf.view(-1, 32)"],
    ),
    "dW[ids] += dY with repeated ids": (
        "gpt", "dwte.index_add_(0, Xb.view(-1), dtok.view(B * T, C))", "dwte[Xb] += dtok", "wte",
        ["repeat", "one write per index", "dwte.index_add_(0, Xb.view(-1), dtok.view(-1, 32))"],
    ),
}  # fmt: skip

DIAGNOSIS = {  # the diagnosis kind the contract gives, where one fits
    "attention scale dropped from dq": "scale",
    "attention scale dropped from dk": "scale",
    "tied weights: the lookup's part forgotten": "missing_branch",
    "tied weights: the head's part forgotten": "missing_branch",
    "dW[ids] += dY with repeated ids": "dropped_duplicates",
}


def run(client, preset_id: str, backward: str | None = None, dtype: str = "float64") -> dict:
    req = dict(presets.preset(preset_id)["request"])
    if backward is not None:
        req["backward"] = backward
    r = client.post("/api/program", json={**req, "dtype": dtype})
    assert r.status_code == 200, r.text[:800]
    body = r.json()
    assert body["backward_error"] is None, body["backward_error"]
    return body


def slipped(preset_id: str, old: str, new: str) -> str:
    backward = presets.preset(preset_id)["request"]["backward"]
    assert old in backward, old
    return backward.replace(old, new)


@pytest.mark.parametrize("slip", list(SLIPS))
def test_each_slip_is_named_at_its_tensor(client, slip):
    preset_id, old, new, tensor, words = SLIPS[slip]
    body = run(client, preset_id, slipped(preset_id, old, new))
    rows = body["check"]["tensors"]
    row = rows[tensor]
    assert row["written"] and row["shape_ok"] and not row["allclose"], row
    hint = row["hint"]
    assert hint, (slip, row.get("diagnosis"))
    for word in words:
        assert word in hint, (slip, word, hint)
    # exactly there: every gradient the backward finished before it is still all-close ...
    order = list(rows)
    before = [n for n in order[: order.index(tensor)] if rows[n]["written"]]
    assert before and all(rows[n]["allclose"] for n in before), [
        n for n in before if not rows[n]["allclose"]
    ]
    # ... and it is not blamed on one of them
    assert row["diagnosis"]["kind"] != "upstream", row["diagnosis"]
    if slip in DIAGNOSIS:
        assert row["diagnosis"]["kind"] == DIAGNOSIS[slip], row["diagnosis"]
    # the other failing rows that only read the slipped gradient are upstream, with no
    # chapter hint of their own
    chapter_words = ("masked positions", "attention scale", "pooling window", "tied",
                     "no gradient is carried", "one write per index")  # fmt: skip
    for name, other in rows.items():
        if name == tensor or other["allclose"] or not other["written"]:
            continue
        if (other.get("diagnosis") or {}).get("kind") == "upstream":
            assert not any(w in (other["hint"] or "") for w in chapter_words), (name, other)


@pytest.mark.parametrize("preset_id", ["gpt", "conv", "rnn"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_correct_chapters_get_no_hint(client, preset_id, dtype):
    body = run(client, preset_id, dtype=dtype)
    assert body["check"]["all_close"]
    assert all(row["hint"] is None for row in body["check"]["tensors"].values())


def test_an_unrelated_slip_gets_none_of_the_chapter_hints(client):
    """A sign lost in dq is a sign, not the attention scale; dv * 2 is not a mask."""
    for old, new, tensor in [
        ("dq = (datt @ k) * hs ** -0.5", "dq = -(datt @ k) * hs ** -0.5", "q"),
        ("dv = p.transpose(-2, -1) @ dyh", "dv = 2 * p.transpose(-2, -1) @ dyh", "v"),
        ("datt = p * (dp - (p * dp).sum(-1, keepdim=True))", "datt = p * dp", "att"),
    ]:
        row = run(client, "gpt", slipped("gpt", old, new))["check"]["tensors"][tensor]
        assert not row["allclose"]
        hint = row["hint"] or ""
        for word in ("attention scale", "masked positions", "summed over dim", "tied"):
            assert word not in hint, (new, hint)


def test_a_rebound_or_shape_only_read_is_not_a_second_use(client):
    """`att = att.masked_fill(...)` rebinds att, and `V, C = wte.shape` reads no numbers: the
    hint for a slip there never says 'used by 2 forward lines' for them."""
    body = run(client, "gpt", slipped("gpt", "(p * dp).sum(-1, keepdim=True)",
                                      "(p * dp).sum(-2, keepdim=True)"))  # fmt: skip
    assert "used by" not in body["check"]["tensors"]["att"]["hint"]
    body = run(
        client, "gpt", slipped("gpt", "dwte.index_add_(0, Xb.view(-1), dtok.view(B * T, C))", "")
    )
    d = body["check"]["tensors"]["wte"]["diagnosis"]
    assert d["kind"] == "missing_branch" and d["missing"] == ["tok"], d
    assert "V, C" not in d["message"]
