// The study page's slice viewer: keyboard, wheel and slider step through slices; buttons pick the window
// preset and the overlay; a click on a label of a multi-label result shows the slice where it is largest.
// Images are PNGs rendered by the server; the neighbours are fetched ahead.
(function () {
  "use strict";
  var img = document.getElementById("slice");
  if (!img) { return; }
  var n = parseInt(img.dataset.slices, 10);
  var job = img.dataset.job;
  var z = parseInt(img.dataset.z, 10);
  var win = img.dataset.window;
  var overlay = img.dataset.overlay;
  var slider = document.getElementById("z");
  var label = document.getElementById("slice-label");
  var ahead = {};

  function url(k) {
    return "/studies/" + job + "/slices/" + k + ".png?window=" + encodeURIComponent(win) +
      "&overlay=" + encodeURIComponent(overlay);
  }
  function prefetch(k) {
    if (k < 0 || k >= n) { return; }
    var u = url(k);
    if (ahead[u]) { return; }
    var i = new Image();
    i.src = u;
    ahead[u] = i;
  }
  function mark() {
    document.querySelectorAll("button.win").forEach(function (b) {
      b.classList.toggle("on", b.dataset.window === win);
    });
    document.querySelectorAll("button.ov").forEach(function (b) {
      b.classList.toggle("on", b.dataset.overlay === overlay);
    });
  }
  function show(k) {
    z = Math.max(0, Math.min(n - 1, k));
    img.src = url(z);
    img.dataset.z = String(z);
    slider.value = String(z);
    label.textContent = "slice " + (z + 1) + " / " + n;
    prefetch(z + 1);
    prefetch(z - 1);
    mark();
  }
  document.addEventListener("keydown", function (e) {
    var t = e.target && e.target.tagName;
    if (t === "INPUT" && e.target.type !== "range") { return; }
    if (t === "SELECT" || t === "TEXTAREA") { return; }
    var step = { ArrowUp: 1, ArrowDown: -1, PageUp: 10, PageDown: -10 }[e.key];
    if (step === undefined) { return; }
    e.preventDefault();
    show(z + step);
  });
  img.addEventListener("wheel", function (e) {
    e.preventDefault();
    show(z + (e.deltaY < 0 ? 1 : -1));
  }, { passive: false });
  slider.addEventListener("input", function () { show(parseInt(slider.value, 10)); });
  document.querySelectorAll("button.win").forEach(function (b) {
    b.addEventListener("click", function () { win = b.dataset.window; ahead = {}; show(z); });
  });
  document.querySelectorAll("button.ov").forEach(function (b) {
    b.addEventListener("click", function () { overlay = b.dataset.overlay; ahead = {}; show(z); });
  });
  document.querySelectorAll("#labels tr.label").forEach(function (row) {
    row.addEventListener("click", function () { show(parseInt(row.dataset.z, 10)); });
  });
  mark();
  prefetch(z + 1);
  prefetch(z - 1);
}());
