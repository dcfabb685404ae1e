// Plotly (~1.5 MB to parse) is needed only by the heatmaps, which sit below the fold: the page
// draws everything else first, then runs Plotly's script, which <link rel="preload"
// id="plotly-js"> has already downloaded. Charts wait on `plotlyReady`; `loadPlotly()` starts it
// after the next paint (calling it again does nothing).
let resolveReady;
export const plotlyReady = new Promise((resolve) => (resolveReady = resolve));
let started = false;

export function loadPlotly() {
  if (window.Plotly) return resolveReady(window.Plotly);
  if (started) return;
  started = true;
  const href = document.getElementById("plotly-js").href;
  // after the next frame is painted, so Plotly's parse never delays the first picture
  requestAnimationFrame(() => setTimeout(() => {
    const script = document.createElement("script");
    script.src = href;
    script.addEventListener("load", () => resolveReady(window.Plotly));
    document.head.append(script);
  }, 0));
}
