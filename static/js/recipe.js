// Real data starts from settings that train. The article's example (plain randn weights, mse
// on the digit as a number) is right for reading the backward pass, but on mnist at lr 0.1 the
// loss overflows within 20 steps. So when image data is chosen with the article's init and
// loss, the page switches to kaiming init and cross-entropy over the 10 digits (out_features
// follows from the data), says so, and keeps the article's settings one click away (the URL
// then says recipe=article, so a link keeps that choice). No imports: main.js loads this
// before it starts the first run, so that the run asked for is the one sent.

export const TRAINS = { init: "kaiming", loss: "cross_entropy" };
export const ARTICLE = { init: "randn", loss: "mse" };

const isImage = (data) => !!data && data !== "random";
const isArticle = (config) => (config.init ?? "randn") === "randn" && (config.loss ?? "mse") === "mse";

/** The settings that train, for a config with image data and the article's init and loss
 * (null when nothing changes). `config` holds only what it names, as a URL's does. */
export function trainable(config, recipe) {
  if (!isImage(config.data) || recipe === "article" || !isArticle(config)) return null;
  const next = { ...config, ...TRAINS };
  delete next.out_features; // the data sets it: 10 for cross-entropy
  return next;
}

/** As trainable(), for a link: one that names init or loss keeps what it names. */
export function trainableLink(config, recipe) {
  return "init" in config || "loss" in config ? null : trainable(config, recipe);
}

/** The note above the Train panel: what the page chose and the way back, or the way there
 * (`h`: format.js's element maker, handed in). */
export function recipeNote(el, config, { switched, onArticle, onTrains }, h) {
  const image = isImage(config.data);
  el.hidden = !image;
  if (!image) return el.replaceChildren();
  const trains = config.init === TRAINS.init && config.loss === TRAINS.loss;
  if (trains) {
    el.className = "notice recipe";
    el.replaceChildren(
      h("b", {}, switched ? "Real data: settings that train. " : "Settings that train. "),
      "Kaiming init (weights scaled by √(2 / fan_in)) and cross-entropy over the 10 digits, so SGD at lr 0.1 learns the digits. ",
      "The article's plain randn init with mse on the digit as a number overflows within a few steps here. ",
      h("button", { type: "button", class: "secondary small", id: "recipe-article", onclick: onArticle }, "Use the article's randn init and mse"));
  } else if (isArticle(config)) {
    el.className = "notice recipe bad";
    el.replaceChildren(
      h("b", {}, "The article's settings on real data: "),
      "plain randn weights and mse make outputs in the hundreds; at lr 0.1 the loss overflows within 20 steps. ",
      h("button", { type: "button", class: "small", id: "recipe-trains", onclick: onTrains }, "Use kaiming init and cross-entropy"));
  } else {
    el.hidden = true;
    el.replaceChildren();
  }
}
