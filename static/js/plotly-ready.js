// Plotly is loaded by a deferred <script id="plotly-js"> after the page's modules, so the run's
// request starts before Plotly's bundle is parsed; charts wait on this promise.
export const plotlyReady = new Promise((resolve) => {
  if (window.Plotly) return resolve(window.Plotly);
  const el = document.getElementById("plotly-js");
  const done = () => window.Plotly && resolve(window.Plotly);
  el?.addEventListener("load", done);
  window.addEventListener("load", done);
});
