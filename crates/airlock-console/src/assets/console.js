// Airlock console: live updates. The server sends `change` on /events when the tenant's
// approvals or policy moved; every element with `data-live-src` is fetched again and its
// content replaced by the server-rendered (escaped) fragment. No inline script, no eval.
(function () {
  "use strict";
  var regions = document.querySelectorAll("[data-live-src]");
  if (!regions.length || !window.EventSource) { return; }
  var busy = false;
  var again = false;

  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    var jobs = Array.prototype.map.call(regions, function (region) {
      return fetch(region.getAttribute("data-live-src"), {
        credentials: "same-origin",
        headers: { "Accept": "text/html" },
        redirect: "follow"
      }).then(function (response) {
        if (response.redirected || response.status === 401) { window.location.reload(); return; }
        if (!response.ok) { return; }
        return response.text().then(function (text) {
          var doc = new DOMParser().parseFromString(text, "text/html");
          var fresh = doc.body.firstElementChild;
          if (fresh) { region.replaceChildren.apply(region, Array.prototype.slice.call(fresh.childNodes)); }
        });
      });
    });
    Promise.all(jobs).catch(function () { return null; }).then(function () {
      document.body.setAttribute("data-live-at", String(Date.now()));
      busy = false;
      if (again) { again = false; refresh(); }
    });
  }

  var source = new EventSource("/events");
  source.addEventListener("change", refresh);
  source.addEventListener("signed_out", function () { source.close(); window.location.reload(); });
})();
