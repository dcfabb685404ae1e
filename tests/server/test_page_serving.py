"""How the page is served (issue 11): gzip that leaves the body limit and strict JSON alone,
Server-Timing, versioned static URLs, and a small run's values."""

import re

import numpy as np
import pytest

pytestmark = pytest.mark.app_settings(max_body_bytes=4096)

GZIP = {"accept-encoding": "gzip"}


def test_runs_are_gzipped_and_timed(client):
    r = client.post("/api/run", json={"batch": 64, "in_features": 20, "hidden": [16]}, headers=GZIP)
    assert r.status_code == 200
    assert r.headers["content-encoding"] == "gzip"
    assert re.fullmatch(r"app;dur=\d+\.\d", r.headers["server-timing"])
    assert r.json()["check"]["all_close"] is True  # decoded: the same strict JSON


def test_small_and_refused_bodies_are_not_compressed(client):
    health = client.get("/healthz", headers=GZIP)
    assert "content-encoding" not in health.headers
    big = client.post(
        "/api/run",
        content=b'{"batch": ' + b" " * 5000 + b"1}",
        headers={**GZIP, "content-type": "application/json"},
    )
    assert big.status_code == 413 and "BROADPROP_MAX_BODY_BYTES" in big.json()["detail"]
    bad = client.post("/api/run", json={"batch": 0}, headers=GZIP)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "batch"]


def test_static_urls_are_versioned_and_modules_import_the_same_version(client):
    html = client.get("/").text
    src = re.search(r'src="(/static/js/main\.js\?v=(\w+))"', html)
    version = src[2]
    main = client.get(src[1])
    assert "immutable" in main.headers["cache-control"]
    assert f'import("./api.js?v={version}")' in main.text or f'"./api.js?v={version}"' in main.text
    assert './checks.js")' not in main.text  # every relative import carries the version
    assert client.get("/static/js/main.js").headers["cache-control"] == "no-cache"
    assert client.get("/static/js/main.js?v=old").headers["cache-control"] == "no-cache"
    assert client.get("/static/js/nope.js").status_code == 404


def test_small_runs_send_their_values_and_large_ones_do_not(client):
    small = client.post("/api/run", json={"batch": 2, "in_features": 3, "hidden": [4]}).json()
    values = small["values"]
    for name, info in small["tensors"].items():
        assert list(np.shape(values["tensors"][name])) == info["shape"], name
    for name, view in small["gradients"].items():
        g = np.array(values["grads"][name])
        assert list(g.shape) == view["shape"]
        assert g.min() == pytest.approx(view["stats"]["min"], rel=1e-6, abs=1e-12)
    assert "values" not in client.post("/api/run", json={"batch": 9, "in_features": 3}).json()


def test_downsampled_heatmaps_carry_block_extremes(client):
    r = client.post("/api/run", json={"max_cells": 1, "reference_heatmaps": True}).json()
    x = r["gradients"]["x"]
    stats = x["stats"]
    (extreme,) = x["heatmap"]["extreme"][0]
    # the one cell keeps the tensor's entry of largest magnitude (a mean would shrink it)
    assert abs(extreme) == pytest.approx(max(abs(stats["min"]), abs(stats["max"])), rel=1e-6)
    assert "extreme" in x["reference_heatmap"]
    small = client.post("/api/run", json={"batch": 4, "in_features": 3}).json()
    assert "extreme" not in small["gradients"]["x"]["heatmap"]


def _imports_from(entry: str) -> set[str]:
    """Every module `entry` imports, directly or not, read from the files themselves."""
    import posixpath
    from pathlib import Path

    static = Path(__file__).resolve().parents[2] / "static"
    found: set[str] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        text = (static / path).read_text(encoding="utf-8")
        for spec in re.findall(r"""(?:from|import)\s*\(?\s*["'](\.{1,2}/[^"']+\.js)["']""", text):
            name = posixpath.normpath(posixpath.join(posixpath.dirname(path), spec))
            if name not in found:
                found.add(name)
                todo.append(name)
    return found


@pytest.mark.parametrize(
    "page, entries", [("/", ["js/main.js", "js/train.js"]), ("/program", ["js/program.js"])]
)
def test_a_page_preloads_its_whole_module_graph_at_once(client, page, entries):
    """<link rel="modulepreload"> for every module the page's scripts import, at the current
    version: the browser asks for them all at once instead of one level per round trip."""
    html = client.get(page).text
    preloaded = re.findall(r'<link rel="modulepreload" href="/static/([^"?]+)\?v=(\w+)">', html)
    wanted = set().union(*(_imports_from(e) for e in entries)) - set(entries)
    assert {path for path, _ in preloaded} == wanted
    assert len(preloaded) == len(wanted) > 5
    version = re.search(r'src="/static/js/[^"?]+\?v=(\w+)"', html)[1]
    assert {v for _, v in preloaded} == {version}
    for path, v in preloaded:
        response = client.get(f"/static/{path}?v={v}")
        assert response.status_code == 200, path
        assert response.headers["cache-control"].endswith("immutable"), path
