"""The console's stylesheet and script, served by the console itself (no CDN, no library).

The script fetches the live part of the page every few seconds and swaps it in (the same
server-rendered HTML as the first load); when the console stops answering it says so and keeps
the last state on screen.
"""

from __future__ import annotations

SCRIPT = """\
"use strict";
(function () {
  var seconds = Number(document.body.dataset.refresh || "2");
  var live = document.getElementById("live");
  var connection = document.getElementById("connection");
  function refresh() {
    fetch("live", {credentials: "same-origin", cache: "no-store"})
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        var open = Array.prototype.map.call(
          live.querySelectorAll("details[open]"), function (d) { return d.parentElement.id; });
        live.innerHTML = html;
        open.forEach(function (id) {
          var d = document.querySelector("#" + id + " details");
          if (d) { d.open = true; }
        });
        connection.textContent = "live";
        connection.className = "";
      })
      .catch(function (error) {
        connection.textContent = "console not answering (" + error.message + "): last state shown";
        connection.className = "stale";
      })
      .finally(function () { window.setTimeout(refresh, seconds * 1000); });
  }
  window.setTimeout(refresh, seconds * 1000);
})();
"""

STYLE = """\
body { font-family: system-ui, sans-serif; margin: 1rem 2rem; color: #222; background: #fafafa; }
header h1 { margin: 0; font-size: 1.4rem; }
h2 { font-size: 1.1rem; margin: 1.2rem 0 0.4rem; border-bottom: 1px solid #ccc; }
h3 { font-size: 0.95rem; margin: 0.8rem 0 0.3rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.3rem 1rem 0.3rem 0; }
th, td { border: 1px solid #ddd; padding: 0.2rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #eee; }
.note, .where, .empty { color: #666; font-size: 0.8rem; }
.phase { font-weight: bold; padding: 0.1rem 0.5rem; border-radius: 0.3rem; background: #e0e7ff; }
.phase-finished { background: #d1fae5; }
.phase-stopped { background: #fee2e2; }
.online-online { color: #047857; font-weight: bold; }
.online-offline, .online-unknown { color: #92400e; }
.status-failed, .status-timeout, .status-refused, .status-dropped, .verdict-unfit, .verdict-failed {
  color: #b91c1c; font-weight: bold; }
.status-declined { color: #92400e; }
.verdict-fit { color: #047857; font-weight: bold; }
.charts { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; padding: 0.3rem; }
figcaption { font-size: 0.85rem; font-weight: bold; }
.axis { stroke: #888; stroke-width: 1; }
.tick { font-size: 10px; fill: #555; }
.legend { list-style: none; padding: 0; display: flex; gap: 1rem; font-size: 0.85rem; }
.columns { display: flex; flex-wrap: wrap; }
.log { font-family: monospace; font-size: 0.75rem; }
#connection.stale { color: #b91c1c; font-weight: bold; }
"""
