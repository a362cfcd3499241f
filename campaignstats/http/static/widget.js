/*
 * campaignstats counter widget: <campaign-counter campaign="1" goal="auto"></campaign-counter>
 *
 * No dependencies, no build step (docs/http.md, "The widget"). The element shows the campaign's
 * supporters formatted for the page's language, and with `goal` a progress bar toward the next
 * goal ("auto": the campaign's goals, read from GET /v1/campaigns/{id}/goals, by default Proca's
 * ladder; a number: that goal). It follows the campaign's event
 * stream and polls `/count` every 10 s (the `poll` attribute, in seconds, at least 1) while the
 * stream is not open (or where EventSource does not exist). The number it shows is its `value` property and `data-value` attribute (a plain
 * integer), and each change fires `campaign-counter:update` with the value as `detail`.
 *
 * Attributes: campaign (required), goal ("auto" or a number; none: no bar), server (the base URL
 * of the campaignstats HTTP server; default: where this script was loaded from), lang, poll.
 * Styling: --campaign-counter-color, --campaign-counter-font, --campaign-counter-font-size,
 * --campaign-counter-font-weight, --campaign-counter-bar-color, --campaign-counter-bar-background,
 * --campaign-counter-bar-height, --campaign-counter-bar-radius, --campaign-counter-goal-color;
 * parts: value, goal, bar, fill.
 */
(function () {
  "use strict";
  if (typeof window === "undefined" || !window.customElements) return;
  if (window.customElements.get("campaign-counter")) return;

  // Proca's goal ladder, until the campaign's own goals are read (GET .../goals): the next
  // threshold above the count is the goal ("auto").
  var LADDER = [100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000, 500000,
    1000000, 2000000, 5000000];
  var POLL_MS = 10000;
  var POLL_MS_MIN = 1000;  // a page cannot make its visitors ask more often than once a second
  // The longest delay a timer takes: browsers read it as a 32-bit int (a longer one wraps to a
  // negative or a short delay, and the widget would poll without pause).
  var POLL_MS_MAX = 2147483647;
  var script = document.currentScript;
  var DEFAULT_SERVER = script && script.src ? script.src.replace(/\/widget\.js(\?.*)?$/, "") : "";

  var STYLE =
    ":host{display:inline-block;font:var(--campaign-counter-font,inherit);" +
    "color:var(--campaign-counter-color,inherit);min-width:8em}" +
    ".value{font-size:var(--campaign-counter-font-size,2em);" +
    "font-weight:var(--campaign-counter-font-weight,700);font-variant-numeric:tabular-nums}" +
    ".goal{color:var(--campaign-counter-goal-color,#666);margin-left:.4em}" +
    ".bar{height:var(--campaign-counter-bar-height,.6em);" +
    "background:var(--campaign-counter-bar-background,#e5e5e5);" +
    "border-radius:var(--campaign-counter-bar-radius,.3em);overflow:hidden;margin-top:.3em}" +
    ".fill{height:100%;width:0;background:var(--campaign-counter-bar-color,#2a8f4a);" +
    "transition:width .4s ease-out}" +
    "[hidden]{display:none}";

  function nextGoal(value, ladder) {
    for (var i = 0; i < ladder.length; i++) if (ladder[i] > value) return ladder[i];
    return ladder.length ? ladder[ladder.length - 1] : 0;
  }

  class CampaignCounter extends HTMLElement {
    static get observedAttributes() { return ["campaign", "goal", "server", "lang"]; }

    constructor() {
      super();
      this._value = null;
      this._ladder = LADDER;
      this._source = null;
      this._timer = null;
      var root = this.attachShadow({ mode: "open" });
      root.innerHTML =
        "<style>" + STYLE + "</style>" +
        '<span class="value" part="value">\u2026</span><span class="goal" part="goal" hidden></span>' +
        '<div class="bar" part="bar" hidden><div class="fill" part="fill"></div></div>';
      this._valueEl = root.querySelector(".value");
      this._goalEl = root.querySelector(".goal");
      this._barEl = root.querySelector(".bar");
      this._fillEl = root.querySelector(".fill");
    }

    /** The number shown, a plain integer (null before the first answer). */
    get value() { return this._value; }

    connectedCallback() { this._start(); }
    disconnectedCallback() { this._stop(); }

    attributeChangedCallback(name, before, after) {
      if (before === after || !this.isConnected) return;
      if (name === "campaign" || name === "server") { this._stop(); this._start(); }
      else if (name === "goal") { this._readGoals(); this._render(); }
      else this._render();
    }

    _base() {
      var server = this.getAttribute("server") || DEFAULT_SERVER;
      return server.replace(/\/+$/, "") + "/v1/campaigns/" + encodeURIComponent(this._campaign);
    }

    _start() {
      this._campaign = (this.getAttribute("campaign") || "").trim();
      if (!/^[0-9]+$/.test(this._campaign)) return;
      var self = this;
      this._ladder = LADDER;
      this._readGoals();
      if (typeof window.EventSource === "function") {
        var source = new EventSource(this._base() + "/events");
        this._source = source;
        source.addEventListener("stats", function (event) {
          try { self._set(JSON.parse(event.data).supporters); } catch (e) { /* ignore */ }
        });
        // A goal reached: the campaign's goals may have moved on (set_goals), read them again.
        source.addEventListener("milestone", function () { self._readGoals(); });
        source.onopen = function () { self._stopPolling(); };
        // While the stream is down (reconnecting, or closed for good), poll.
        source.onerror = function () { self._startPolling(); };
      } else {
        this._startPolling();
      }
    }

    _stop() {
      if (this._source) { this._source.close(); this._source = null; }
      this._stopPolling();
    }

    _startPolling() {
      if (this._timer !== null) return;
      var self = this;
      this._poll();
      this._timer = setInterval(function () { self._poll(); }, this._pollMs());
    }

    _stopPolling() {
      if (this._timer !== null) { clearInterval(this._timer); this._timer = null; }
    }

    // The `poll` attribute in seconds: a number of at least 1 (at most about 24 days, what a
    // timer holds), else the default of 10.
    _pollMs() {
      var seconds = Number((this.getAttribute("poll") || "").trim());
      if (!isFinite(seconds) || seconds <= 0) return POLL_MS;
      return Math.min(POLL_MS_MAX, Math.max(POLL_MS_MIN, Math.round(seconds * 1000)));
    }

    _poll() {
      var self = this;
      if (typeof fetch !== "function") return;
      fetch(this._base() + "/count", { headers: { Accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (body) { if (body) self._set(body.supporters); })
        .catch(function () { /* the next poll tries again */ });
    }

    _readGoals() {
      var self = this;
      if ((this.getAttribute("goal") || "").trim() !== "auto" || typeof fetch !== "function") return;
      fetch(this._base() + "/goals", { headers: { Accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (body) {
          if (body && Array.isArray(body.supporters)) {
            self._ladder = body.supporters;
            self._render();
          }
        })
        .catch(function () { /* keep the default ladder */ });
    }

    _set(supporters) {
      var value = Math.floor(Number(supporters));
      if (!isFinite(value) || value === this._value) return;
      this._value = value;
      this.setAttribute("data-value", String(value));
      this._render();
      this.dispatchEvent(new CustomEvent("campaign-counter:update", {
        detail: value, bubbles: true, composed: true,
      }));
    }

    _locale() {
      var el = this.closest("[lang]");
      var lang = (el && el.getAttribute("lang")) || navigator.language || undefined;
      return lang || undefined;
    }

    _format(n) {
      try { return new Intl.NumberFormat(this._locale()).format(n); }
      catch (e) { return String(n); }
    }

    _render() {
      if (this._value === null) return;
      var value = this._value;
      this._valueEl.textContent = this._format(value);
      var goalAttr = (this.getAttribute("goal") || "").trim();
      var goal = goalAttr === "auto" ? nextGoal(value, this._ladder) : Math.floor(Number(goalAttr));
      if (!goalAttr || !isFinite(goal) || goal <= 0) {
        this._goalEl.hidden = true;
        this._barEl.hidden = true;
        return;
      }
      this._goalEl.hidden = false;
      this._barEl.hidden = false;
      this._goalEl.textContent = "/ " + this._format(goal);
      var pct = Math.min(100, (100 * value) / goal);
      this._fillEl.style.width = pct.toFixed(2) + "%";
      this._barEl.setAttribute("role", "progressbar");
      this._barEl.setAttribute("aria-valuemin", "0");
      this._barEl.setAttribute("aria-valuemax", String(goal));
      this._barEl.setAttribute("aria-valuenow", String(value));
    }
  }

  window.customElements.define("campaign-counter", CampaignCounter);
})();
