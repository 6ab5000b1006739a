/*
 * CAT Relay browser client: a faction's events from a CAT Relay, behind the WebSocket surface today's
 * CAT userscript drives (its RealtimeManager). `createCATRelayConnection(wsUrl)` and
 * `new CATRelayClient(relayUrl, factionId, apiKey)` both return a WebSocket stand-in: readyState,
 * connect(), onopen/onmessage/onclose/onerror, addEventListener, send (Phoenix joins, heartbeats,
 * published updates) and close. docs/client.md describes it and the script author's steps.
 *
 * Plain ES2017 without modules, so that it runs from a <script> tag, a Tampermonkey @require or text
 * injected by TornPDA. The exports are top-level `var`s: globals on a page, and names in scope for a
 * userscript that @requires it into its own wrapper. The relay appends a line setting
 * CATRelay.defaults.relayUrl to its own address when it serves this file.
 */
var CATRelay = (function () {
  'use strict';

  var DEFAULTS = {
    relayUrl: '', // the relay's address: set by the relay that served this file, else set it yourself
    transport: 'auto', // or 'sse', 'long-poll', 'poll' to pin one
    // A GM_xmlhttpRequest-style function; SSE cannot go through it, so it long-polls. Under a userscript
    // manager that granted GM_xmlhttpRequest, that: it needs no CORS and no room in the page's connect-src.
    request: typeof GM_xmlhttpRequest === 'function' ? GM_xmlhttpRequest : null,
    EventSource: null, // defaults to the page's
    waitS: 25, // long-poll hold: under the relay's 30 s cap and common 30-60 s proxy idle timeouts
    backoffInitialMs: 1000,
    backoffMaxMs: 30000,
    // While the relay is unreachable (restarting, redeployed) retries are spread at random under this,
    // so that delivery resumes within seconds of its return without every member knocking at once.
    outageRetryMaxMs: 5000,
    errorsBeforeFallback: 3, // consecutive failures of one transport, the relay reachable, before a simpler one
    random: Math.random,
    log: typeof console !== 'undefined' ? console : null, // anything with warn/info; null for silence
  };
  var PING_TIMEOUT_MS = 5000; // what today's script allows /ping
  var REQUEST_TIMEOUT_MS = 15000;
  var HELD_MARGIN_MS = 10000; // a long-poll gets this much beyond its wait before we call it dead
  var LEGACY_POLL_MS = 3000; // today's cadence, for a relay that gives no next_poll_ms
  var RETRY_BETTER_AFTER_MS = 5 * 60 * 1000; // a fallback is not forever: networks and proxies change
  var STREAM_HEALTHY_MS = 60000; // a stream that lasted this long before it ended did not "fail"
  // EventSource dispatches on the `event:` field, so each type the relay may send is listened for.
  var STREAM_TYPES = ['postgres_changes', 'hospital_update', 'faction_members_update', 'message'];
  // The two types today's script hands to handlers rather than to its WebSocket message path.
  var HANDLERS = { hospital_update: 'onHospitalUpdate', faction_members_update: 'onFactionMembersUpdate' };
  var STATES = { CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3 };
  // /subscribe answers after which trying again cannot help: a bad faction, key, or no relay at that URL.
  var FINAL_REFUSALS = [400, 401, 403, 404];
  var FILTER = /^([A-Za-z_][A-Za-z0-9_]*)=(eq|neq|lt|lte|gt|gte|in)\.(.*)$/;
  var ORDER = { lt: function (a, b) { return a < b; }, lte: function (a, b) { return a <= b; },
    gt: function (a, b) { return a > b; }, gte: function (a, b) { return a >= b; } };
  var clients = {}; // "relay|faction|key" -> the latest client, whose place a new one takes

  function later(fn) {
    setTimeout(fn, 0);
  }

  function makeEvent(type, target, fields) {
    var event = { type: type, target: target, currentTarget: target, timeStamp: Date.now() };
    return Object.assign(event, fields);
  }

  // A throwing handler must not stop delivery to the others, yet should still show in the console.
  function invoke(listener, target, event) {
    try {
      if (typeof listener === 'function') listener.call(target, event);
      else if (listener && typeof listener.handleEvent === 'function') listener.handleEvent(event);
    } catch (error) {
      later(function () { throw error; });
    }
  }

  function parseJson(text) {
    try {
      return JSON.parse(text);
    } catch (error) {
      return null;
    }
  }

  function describe(answer) {
    var body = answer.body || {};
    return answer.status + (body.code ? ' ' + body.code : '') + (body.error ? ': ' + body.error : '');
  }

  /* addEventListener/removeEventListener with several listeners per type, as on an EventTarget. */
  class Emitter {
    constructor() {
      this._listeners = {};
    }

    addEventListener(type, listener) {
      var list = this._listeners[type] || (this._listeners[type] = []);
      if (listener && list.indexOf(listener) < 0) list.push(listener);
    }

    removeEventListener(type, listener) {
      var list = this._listeners[type] || [];
      if (list.indexOf(listener) >= 0) list.splice(list.indexOf(listener), 1);
    }

    // The `on…` properties first, then the listeners in the order they were added.
    _emit(type, event, properties) {
      (properties || []).forEach(function (p) { if (this[p]) invoke(this[p], this, event); }, this);
      (this._listeners[type] || []).slice().forEach(function (l) { invoke(l, this, event); }, this);
    }
  }

  /* XMLHttpRequest behind GM_xmlhttpRequest's interface, so that both take one code path. */
  function xhrRequest(details) {
    var xhr = new XMLHttpRequest();
    xhr.open(details.method, details.url);
    xhr.timeout = details.timeout;
    Object.keys(details.headers).forEach(function (k) { xhr.setRequestHeader(k, details.headers[k]); });
    xhr.onload = function () { details.onload({ status: xhr.status, responseText: xhr.responseText }); };
    ['onerror', 'ontimeout', 'onabort'].forEach(function (on) {
      xhr[on] = function () { details[on]({ status: 0 }); };
    });
    xhr.send(details.data === undefined ? null : details.data);
    return xhr;
  }

  /* A `postgres_changes` subscription as the script sends it in a phx_join: table, event, one filter. */
  function parseBinding(entry, carried) {
    if (!entry || typeof entry !== 'object') return { error: 'a postgres_changes entry must be an object' };
    var schema = entry.schema === undefined ? 'public' : entry.schema;
    var table = entry.table === undefined ? '*' : entry.table;
    var event = String(entry.event === undefined ? '*' : entry.event).toUpperCase();
    if (schema !== 'public' && schema !== '*') return { error: 'CAT Relay carries only the public schema' };
    if (table !== '*' && carried && carried.indexOf(table) < 0) {
      return { error: 'CAT Relay does not carry table ' + table + ' (it carries ' + carried.join(', ') + ')' };
    }
    var filter = null, text = typeof entry.filter === 'string' ? entry.filter.trim() : '';
    if (text) {
      var parts = FILTER.exec(text);
      if (!parts) return { error: 'CAT Relay cannot apply the filter ' + JSON.stringify(text) };
      var values = [parts[3]];
      if (parts[2] === 'in') {
        if (!/^\(.*\)$/.test(parts[3])) return { error: '`in` filter value must be wrapped by parentheses' };
        values = parts[3].slice(1, -1).split(',');
      }
      filter = { column: parts[1], op: parts[2], values: values };
    }
    var shown = { event: event, schema: schema, table: table, filter: text };
    return { event: event, table: table, filter: filter, shown: shown };
  }

  // Postgres compares the filter's text cast to the column's type; the value's own text form gives the
  // same answer for the integer, text and boolean columns CAT filters on. NULL or absent matches nothing.
  function filterMatches(filter, row) {
    if (!filter) return true;
    var value = row ? row[filter.column] : null;
    if (value === null || value === undefined) return false;
    var actual = String(value);
    if (filter.op === 'in') return filter.values.indexOf(actual) >= 0;
    if (filter.op === 'eq' || filter.op === 'neq') return (actual === filter.values[0]) === (filter.op === 'eq');
    var a = Number(actual), b = Number(filter.values[0]);
    return isNaN(a) || isNaN(b) ? ORDER[filter.op](actual, filter.values[0]) : ORDER[filter.op](a, b);
  }

  function bindingWants(binding, change) {
    if (binding.table !== '*' && binding.table !== change.table) return false;
    if (binding.event !== '*' && binding.event !== change.eventType) return false;
    return filterMatches(binding.filter, change.eventType === 'DELETE' ? change.old : change.new);
  }

  /* A client update a caller may send(): {event|type: 'hospital_update', data|payload|members}, bare or
   * as a Realtime broadcast frame's payload. */
  function clientUpdate(frame) {
    var source = frame.event === 'broadcast' && frame.payload ? frame.payload : frame;
    var type = HANDLERS[source.event] ? source.event : HANDLERS[source.type] ? source.type : null;
    if (!type) return null;
    var data = 'data' in source ? source.data : 'payload' in source ? source.payload : source.members;
    return { type: type, data: data };
  }

  /* A Phoenix v1 {topic, event, payload, ref, join_ref} or v2 [join_ref, ref, topic, event, payload]. */
  function phoenixFrame(value) {
    if (Array.isArray(value) && value.length === 5) {
      return { join_ref: value[0], ref: value[1], topic: value[2], event: value[3], payload: value[4], v2: true };
    }
    if (value && typeof value.topic === 'string' && typeof value.event === 'string') return value;
    return null;
  }

  function phoenixReply(frame, payload) {
    if (frame.v2) return [frame.join_ref, frame.ref, frame.topic, 'phx_reply', payload];
    var reply = { topic: frame.topic, event: 'phx_reply', payload: payload, ref: frame.ref };
    if (frame.join_ref !== undefined) reply.join_ref = frame.join_ref;
    return reply;
  }

  class CATRelayClient extends Emitter {
    constructor(relayUrl, factionId, apiKey, options) {
      super();
      this.relayUrl = String(relayUrl).replace(/\/+$/, '');
      this.factionId = factionId;
      this.apiKey = apiKey;
      this.options = Object.assign({}, DEFAULTS, options);
      this.url = this.relayUrl; // createCATRelayConnection puts the WebSocket URL it was given here
      this.readyState = STATES.CONNECTING;
      this.protocol = '';
      this.extensions = '';
      this.bufferedAmount = 0;
      this.binaryType = 'blob';
      this.onopen = this.onmessage = this.onerror = this.onclose = null;
      this.onMessage = null; // the earlier name of onmessage, still called
      this.onHospitalUpdate = null; // called with event.data, as today's handlers are
      this.onFactionMembersUpdate = null;
      this.cursor = Date.now(); // as today's script starts; subscribe() replaces it with the relay's
      this.subscribed = false;
      this.transport = null; // 'sse' | 'long-poll' | 'poll' while delivering
      this.lastStatus = null; // of the last /subscribe; 0 when it got no answer
      this.lastError = null;
      this._running = false; // the delivery loop runs (while CONNECTING it waits for the relay)
      this._connecting = null; // connect()'s promise while CONNECTING
      this._settle = null;
      this._attempt = 0; // bumped per request, stream or timer: a callback from an older one is stale
      this._timer = null;
      this._requests = []; // delivery requests in flight, which close() aborts
      this._source = null;
      this._errors = 0; // consecutive failures, for the backoff
      this._levelErrors = 0; // consecutive failures of the current transport, for the fallback
      this._level = 0; // index into _transports(): 0 is the best this page allows
      this._retryBetterAt = 0;
      this._delivered = false;
      this._resubscribe = false;
      this._resync = false; // the relay said events after our cursor are gone: reload its state
      this._rows = {}; // table -> JSON of the key -> row: the faction's rows as our events left them
      this._keys = {}; // table -> key column, from /state: also the tables the relay carries
      this._stateless = false; // the relay gave no state when asked: take `truncated` answers as they are
      this._joins = {}; // topic -> the postgres_changes bindings its phx_join asked for
      this._takeOver(clients[this._identity()]);
      clients[this._identity()] = this;
      CATRelayClient.latest = this;
    }

    _identity() {
      return this.relayUrl + '|' + this.factionId + '|' + this.apiKey;
    }

    /* The script makes a new socket after each close: the new one goes on from the old one's cursor,
     * rows and joins (the script does not join again), so that nothing in between is lost. */
    _takeOver(previous) {
      if (!previous) return;
      if (previous.readyState < STATES.CLOSING) previous._stop(null); // silently: it has been replaced
      ['cursor', 'subscribed', '_delivered', '_rows', '_keys', '_stateless', '_joins'].forEach(function (k) {
        this[k] = previous[k];
      }, this);
    }

    /* Resolves true when the relay answers 200 with a truthy `deployed` or `status`; never rejects. */
    async ping() {
      var answer = await this._call('GET', '/ping', undefined, PING_TIMEOUT_MS, false).catch(function () {
        return { status: 0, body: null };
      });
      return answer.status === 200 && !!answer.body && !!(answer.body.deployed || answer.body.status);
    }

    /* Resolves true on "subscribed", taking the starting cursor from the answer; else false, with
     * lastStatus and lastError saying why. Never rejects. */
    async subscribe() {
      var payload = { faction_id: this.factionId, api_key: this.apiKey };
      var answer = await this._call('POST', '/subscribe', payload, REQUEST_TIMEOUT_MS).catch(function (e) {
        return { status: 0, body: { error: e.message } };
      });
      this.lastStatus = answer.status;
      this.subscribed = answer.status === 200 && !!answer.body && answer.body.status === 'subscribed';
      if (!this.subscribed) {
        this.lastError = describe(answer);
        return false;
      }
      var stamp = answer.body.timestamp;
      // Before any delivery the relay's cursor replaces ours (our clock may be off); after, it may only
      // move forward, or events already handed out would come again.
      if (typeof stamp === 'number') this.cursor = this._delivered ? Math.max(this.cursor, stamp) : stamp;
      // The rows to follow from here. After a delivery (a resubscription) the page holds what our
      // events said, so the differences to the relay's rows are handed to it too.
      await this.loadState(this._delivered);
      return true;
    }

    /* GET /state: the faction's rows and the cursor they correspond to, which becomes ours. With
     * `emitDifferences`, what changed against the rows our events left is delivered as resync
     * changes first. Resolves false (changing nothing) when the relay gives no state. */
    async loadState(emitDifferences) {
      var path = '/state?faction_id=' + encodeURIComponent(this.factionId);
      var answer = await this._call('GET', path, undefined, REQUEST_TIMEOUT_MS).catch(function () { return null; });
      var state = answer && answer.status === 200 ? answer.body : null;
      if (!state || typeof state.timestamp !== 'number' || !state.tables || typeof state.tables !== 'object') {
        return false;
      }
      var keys = state.keys && typeof state.keys === 'object' ? state.keys : {};
      var rows = {};
      Object.keys(state.tables).forEach(function (table) {
        var key = keys[table];
        if (typeof key !== 'string' || !Array.isArray(state.tables[table])) return;
        rows[table] = {};
        state.tables[table].forEach(function (row) {
          if (row && typeof row === 'object' && key in row) rows[table][JSON.stringify(row[key])] = row;
        });
      });
      if (emitDifferences) this._emitDifferences(rows, state.timestamp);
      this._rows = rows;
      this._keys = keys;
      this._stateless = false;
      this.cursor = this._delivered ? Math.max(this.cursor, state.timestamp) : state.timestamp;
      return true;
    }

    /* Resolves true once the relay delivers (`open` follows, after the caller's own `await` has gone
     * on), false when the relay refuses this key or faction for good (`error` and `close` follow).
     * While the relay cannot be reached it keeps trying: the promise waits rather than rejects. */
    connect() {
      if (this.readyState === STATES.OPEN) return Promise.resolve(true);
      if (this._connecting) return this._connecting;
      this.readyState = STATES.CONNECTING;
      this._connecting = new Promise((resolve) => { this._settle = resolve; });
      this._running = true;
      this._errors = this._levelErrors = this._level = 0;
      this._step();
      return this._connecting;
    }

    /* As WebSocket.close(): stops delivery, then `close` (wasClean). connect() again resumes from the
     * cursor. Publications already sent still complete. */
    close(code, reason) {
      if (this.readyState >= STATES.CLOSING) return;
      var event = { code: code === undefined ? 1000 : code, reason: reason || '', wasClean: true };
      this._stop(event, null);
    }

    /* Phoenix frames get the reply a Realtime server would give (joins are honoured here, by table,
     * event and filter); client updates are published; anything else is dropped. Unlike a WebSocket,
     * nothing throws: before `open` a frame is answered once open, after `close` it is dropped. */
    send(text) {
      if (this.readyState >= STATES.CLOSING) return;
      var value = typeof text === 'string' ? parseJson(text) : null;
      var frame = phoenixFrame(value);
      var update = value && !Array.isArray(value) ? clientUpdate(value) : frame && clientUpdate(frame);
      if (update) {
        this.publish(update.type, update.data).catch((error) => {
          this._log('warn', error.message);
          this._emit('error', makeEvent('error', this, { message: error.message }), ['onerror']);
        });
      }
      if (frame && frame.ref != null) this._reply(frame);
      else if (!update) this._log('warn', 'send() dropped a frame it does not know');
    }

    /* POST /events; resolves with the relay's {status, id, timestamp}, rejects when refused. */
    async publish(type, data) {
      var payload = { faction_id: this.factionId, api_key: this.apiKey, type: type, data: data };
      var answer = await this._call('POST', '/events', payload, REQUEST_TIMEOUT_MS, false);
      if (answer.status === 200 && answer.body && answer.body.status === 'published') return answer.body;
      throw new Error('publishing ' + type + ' was refused: ' + describe(answer));
    }

    _reply(frame) {
      var payload = { status: 'ok', response: {} };
      if (frame.event === 'phx_join') payload = this._join(frame);
      if (frame.event === 'phx_leave') delete this._joins[frame.topic];
      var data = JSON.stringify(phoenixReply(frame, payload));
      var message = makeEvent('message', this, { data: data, origin: this._origin(), lastEventId: '' });
      var deliver = () => { if (this.readyState === STATES.OPEN) this._emit('message', message, ['onmessage', 'onMessage']); };
      if (this.readyState !== STATES.CONNECTING) return later(deliver);
      var self = this;
      this.addEventListener('open', function replay() { // a frame sent before open is answered once open
        self.removeEventListener('open', replay);
        later(deliver);
      });
    }

    /* What a join's postgres_changes select: an error reply (nothing joined) for a table the relay
     * does not carry or a filter it cannot apply, rather than an "ok" that would never deliver. */
    _join(frame) {
      var config = frame.payload && frame.payload.config;
      var entries = config && Array.isArray(config.postgres_changes) ? config.postgres_changes : [];
      var carried = Object.keys(this._keys).length ? Object.keys(this._keys) : null; // null: unknown
      var bindings = entries.map(function (entry) { return parseBinding(entry, carried); });
      var refused = bindings.filter(function (b) { return b.error; });
      if (refused.length) {
        this._log('warn', frame.topic + ': ' + refused[0].error);
        return { status: 'error', response: { reason: refused[0].error } };
      }
      this._joins[frame.topic] = bindings;
      var shown = bindings.map(function (b, i) { return Object.assign({ id: i + 1 }, b.shown); });
      return { status: 'ok', response: entries.length ? { postgres_changes: shown } : {} };
    }

    _stop(closing, error) {
      this._running = false;
      this._attempt++;
      clearTimeout(this._timer);
      this._closeSource();
      this._requests.splice(0).forEach(function (r) { if (r && r.abort) r.abort(); });
      this._setTransport(null);
      var settle = this._settle;
      this._connecting = this._settle = null;
      if (settle) settle(false);
      if (!closing) {
        this.readyState = STATES.CLOSED;
        return;
      }
      // As a WebSocket: CLOSING now, then (after the caller's own code has run) error if unclean, close.
      this.readyState = STATES.CLOSING;
      later(() => {
        if (this.readyState !== STATES.CLOSING) return; // connect() was called again meanwhile
        this.readyState = STATES.CLOSED;
        if (error) this._emit('error', makeEvent('error', this, { message: error, fatal: true }), ['onerror']);
        this._emit('close', makeEvent('close', this, closing), ['onclose']);
      });
    }

    /* Resolves {status, body: parsed JSON or null} for any answer; rejects when there is none. */
    _call(method, path, payload, timeoutMs, track) {
      var request = this.options.request || xhrRequest;
      var requests = this._requests;
      var handle, settled = false;
      return new Promise((resolve, reject) => {
        function settle(fn, value) {
          settled = true;
          if (requests.indexOf(handle) >= 0) requests.splice(requests.indexOf(handle), 1);
          fn(value);
        }
        function fail(what) {
          return function () { settle(reject, new Error(method + ' ' + path + ' ' + what)); };
        }
        handle = request({
          method: method,
          url: this.relayUrl + path,
          headers: payload === undefined ? {} : { 'Content-Type': 'application/json' },
          data: payload === undefined ? undefined : JSON.stringify(payload),
          timeout: timeoutMs,
          onload: function (r) { settle(resolve, { status: r.status, body: parseJson(r.responseText) }); },
          onerror: fail('failed'),
          ontimeout: fail('timed out'),
          onabort: fail('was aborted'),
        });
        if (track !== false && !settled) requests.push(handle);
      });
    }

    /* One delivery request or stream: subscribe if needed, resync if told to, then the transport. While
     * CONNECTING the first request is a quick poll, so that `open` says the relay answered. */
    async _step() {
      var token = ++this._attempt;
      if (this._resync && !this._resubscribe && this.subscribed) {
        // Whatever happens, carry on: without a state the retained events are still worth having.
        this._resync = false;
        var loaded = await this.loadState(true);
        if (token !== this._attempt) return;
        if (!loaded) {
          this._stateless = true;
          this._log('warn', 'events were missed and the relay gave no state to recover from');
        }
      }
      if (this._resubscribe || !this.subscribed) {
        var ok = await this.subscribe();
        if (token !== this._attempt) return;
        if (!ok && FINAL_REFUSALS.indexOf(this.lastStatus) >= 0) return this._refusedForGood();
        if (!ok) return this._failed(token, new Error('subscribing failed: ' + this.lastError), 'server');
        this._resubscribe = false;
      }
      if (this.readyState === STATES.CONNECTING) return this._poll(token, 0);
      var kind = this._pickTransport();
      this._setTransport(kind);
      if (kind === 'sse') this._openStream(token);
      else this._poll(token, kind === 'long-poll' ? this.options.waitS : 0);
    }

    _transports() {
      var pinned = this.options.transport;
      if (pinned && pinned !== 'auto') return [pinned];
      return (!this.options.request && this._eventSource() ? ['sse'] : []).concat(['long-poll', 'poll']);
    }

    _eventSource() {
      return this.options.EventSource || (typeof EventSource === 'function' ? EventSource : null);
    }

    _pickTransport() {
      var list = this._transports();
      if (this._level > 0 && Date.now() >= this._retryBetterAt) this._level = this._levelErrors = 0;
      return list[Math.min(this._level, list.length - 1)];
    }

    _setTransport(kind) {
      var previous = this.transport;
      if (kind === previous) return;
      this.transport = kind;
      if (kind) this._log('info', 'delivering by ' + kind + (previous ? ' (was ' + previous + ')' : ''));
      this._emit('transport', makeEvent('transport', this, { transport: kind, previous: previous }));
    }

    /* The relay answered: the first answer while CONNECTING resolves connect() and opens (after the
     * caller's `await` went on and set its handlers); `then` runs once open. */
    _delivering(token, then) {
      this._errors = 0;
      if (this.readyState === STATES.OPEN) return then();
      var settle = this._settle;
      this._connecting = this._settle = null;
      if (settle) settle(true);
      later(() => {
        if (token !== this._attempt || !this._running) return;
        this.readyState = STATES.OPEN;
        this._emit('open', makeEvent('open', this), ['onopen']);
        if (token === this._attempt && this._running) then();
      });
    }

    async _poll(token, waitS) {
      var started = Date.now();
      var path = '/events?faction_id=' + encodeURIComponent(this.factionId) + '&since=' + this.cursor;
      var answer;
      try {
        var timeoutMs = waitS ? waitS * 1000 + HELD_MARGIN_MS : REQUEST_TIMEOUT_MS;
        answer = await this._call('GET', path + (waitS ? '&wait=' + waitS : ''), undefined, timeoutMs);
      } catch (error) {
        return this._failed(token, error, waitS ? 'held' : 'network');
      }
      if (token !== this._attempt) return;
      var body = answer.body;
      if (answer.status !== 200 || !body || !Array.isArray(body.events)) return this._refused(token, answer);
      this._delivering(token, () => {
        this._levelErrors = 0;
        if (body.truncated === true && !this._stateless) {
          // What we missed is gone from the relay's events but not from its rows: reload them (which
          // also covers this answer's events) before going on.
          this._resync = true;
          return this._schedule(0);
        }
        this._deliver(body.events);
        // An empty answer's cursor is safe to adopt: the relay stamps every later event above it.
        if (typeof body.timestamp === 'number' && body.timestamp > this.cursor) this.cursor = body.timestamp;
        // An empty long-poll that came back early was not held (shutdown, a relay at its cap, or one that
        // ignores wait=): pausing keeps that from turning into a tight loop. The first quick poll is not.
        var quick = !this.transport; // connect()'s first poll: straight on to the transport
        var held = waitS && (body.events.length > 0 || Date.now() - started >= waitS * 500);
        var pause = typeof body.next_poll_ms === 'number' ? body.next_poll_ms : LEGACY_POLL_MS;
        this._schedule(quick || held ? 0 : pause);
      });
    }

    _openStream(token) {
      var self = this, source, openedAt = 0;
      var url = this.relayUrl + '/events/stream?faction_id=' + encodeURIComponent(this.factionId) +
        '&since=' + this.cursor;
      try {
        source = new (this._eventSource())(url);
      } catch (error) {
        return this._failed(token, error, 'held');
      }
      this._source = source;
      source.onopen = function () {
        if (token !== self._attempt) return;
        openedAt = Date.now();
        self._errors = 0;
      };
      source.addEventListener('truncated', function () {
        if (token !== self._attempt || self._stateless) return;
        self._closeSource();
        self._resync = true;
        self._schedule(0);
      });
      STREAM_TYPES.forEach(function (type) {
        source.addEventListener(type, function (message) {
          var event = token === self._attempt && parseJson(message.data);
          if (!event) return;
          self._levelErrors = 0; // this stream really delivers: not one to fall back from
          self._deliver([event]);
        });
      });
      source.onerror = function () {
        if (token !== self._attempt) return;
        // EventSource would reconnect by itself, but then the backoff, the resume point and the
        // fallback to polling would be out of our hands.
        self._closeSource();
        var healthy = openedAt && Date.now() - openedAt >= STREAM_HEALTHY_MS;
        if (healthy) self._levelErrors = 0;
        var what = new Error('the event stream ' + (openedAt ? 'ended' : 'did not open'));
        self._failed(token, what, healthy ? 'network' : 'held');
      };
    }

    _closeSource() {
      if (this._source) this._source.close();
      this._source = null;
    }

    /* Oldest first; anything at or below the cursor was delivered already (transports overlap). */
    _deliver(events) {
      for (var i = 0; i < events.length && this._running; i++) {
        var event = events[i];
        if (!event || typeof event.timestamp !== 'number' || event.timestamp <= this.cursor) continue;
        this.cursor = event.timestamp;
        this._delivered = true;
        if (event.type === 'postgres_changes') this._track(event.data);
        this._dispatch(event);
      }
    }

    /* Keep our copy of the faction's rows as a change leaves them. */
    _track(change) {
      var key = change && this._keys[change.table];
      if (typeof key !== 'string') return;
      var rows = this._rows[change.table] || (this._rows[change.table] = {});
      var old = change.old || {}, now = change.new || {};
      if (key in old && change.eventType !== 'INSERT') delete rows[JSON.stringify(old[key])];
      if (key in now && change.eventType !== 'DELETE') rows[JSON.stringify(now[key])] = now;
    }

    /* Deliver, as resync changes in the realtime-js shape, what turns our rows into `rows`. */
    _emitDifferences(rows, stamp) {
      var mine = this._rows, at = new Date(stamp).toISOString();
      var tables = Object.keys(rows).concat(Object.keys(mine).filter(function (t) { return !(t in rows); }));
      tables.forEach(function (table) {
        var before = mine[table] || {}, after = rows[table] || {};
        var keys = Object.keys(before).concat(Object.keys(after).filter(function (k) { return !(k in before); }));
        keys.sort().forEach(function (k) {
          var was = before[k], now = after[k];
          if (was && now && JSON.stringify(was) === JSON.stringify(now)) return;
          var kind = !was ? 'INSERT' : !now ? 'DELETE' : 'UPDATE';
          var change = { schema: 'public', table: table, commit_timestamp: at, eventType: kind,
            new: now || {}, old: was || {}, errors: null, resync: true };
          this._dispatch({ type: 'postgres_changes', timestamp: stamp, data: change });
        }, this);
      }, this);
    }

    _origin() {
      return this.relayUrl.replace(/^(\w+:\/\/[^/]+).*$/, '$1');
    }

    /* Updates to their handlers; a change, once per join that selects it (with the join's topic), or
     * as it is when nothing was joined (a caller that never sends phx_join gets every change). */
    _dispatch(event) {
      var handler = HANDLERS[event.type];
      var id = String(event.timestamp);
      if (handler) {
        invoke(this[handler], this, event.data);
        var fields = { data: event.data, lastEventId: id, event: event };
        this._emit(event.type, makeEvent(event.type, this, fields));
        return;
      }
      var change = event.data || {};
      var topics = Object.keys(this._joins);
      var frames = topics.length ? [] : [{ event: 'postgres_changes', payload: change }];
      topics.forEach(function (topic) {
        var wanted = this._joins[topic].some(function (binding) { return bindingWants(binding, change); });
        if (wanted) frames.push({ topic: topic, event: 'postgres_changes', payload: change, ref: null });
      }, this);
      frames.forEach(function (frame) {
        var fields = { data: JSON.stringify(frame), origin: this._origin(), lastEventId: id };
        this._emit('message', makeEvent('message', this, fields), ['onmessage', 'onMessage']);
      }, this);
    }

    _refused(token, answer) {
      var code = answer.body && answer.body.code;
      if (answer.status === 401) return this._refusedForGood(answer);
      if (code === 'not_subscribed') this._resubscribe = true; // the relay lost us (a new database)
      if (code === 'invalid_since') {
        // Our cursor is far ahead of this relay's clock, so this relay did not hand it out: start afresh.
        this._resubscribe = true;
        this._delivered = false;
      }
      var kind = !answer.body || code === 'invalid_wait' ? 'held' : answer.status >= 500 ? 'server' : 'answered';
      this._failed(token, new Error('the relay answered ' + describe(answer)), kind);
    }

    _refusedForGood(answer) {
      if (answer) this.lastError = describe(answer);
      this._log('warn', 'the relay refused this client: ' + this.lastError);
      var code = this.readyState === STATES.OPEN ? 1008 : 1006;
      var reason = (code === 1006 ? 'the relay is unavailable: ' : '') + this.lastError;
      this._stop({ code: code, reason: reason, wasClean: false }, reason);
    }

    /* `kind`: 'held' (a held request or stream failed without an answer), 'network' (another request
     * got no answer), 'server' (5xx), 'answered' (any other refusal). Without an answer, /ping tells
     * a relay that is down (restarting: nothing counts against the transport, and an open socket
     * closes, as a WebSocket's would) from a transport this network breaks (which counts). */
    async _failed(token, error, kind) {
      if (token !== this._attempt || !this._running) return;
      var reachable = kind === 'answered' || ((kind === 'held' || kind === 'network') && (await this.ping()));
      if (token !== this._attempt || !this._running) return;
      this.lastError = error.message;
      this._errors++;
      this._log('warn', error.message + ' (' + this._errors + ' in a row)');
      if (!reachable && this.readyState === STATES.OPEN) {
        // Delivery stopped: say so as a dropped socket does. The caller's connect() (a new socket, which
        // takes this one's place) resumes from the cursor once the relay answers again.
        return this._stop({ code: 1006, reason: 'the relay is unreachable: ' + error.message, wasClean: false },
          error.message);
      }
      this._emit('error', makeEvent('error', this, { message: error.message, fatal: false }));
      if (kind === 'held' && reachable) this._levelErrors++;
      var simpler = this._level < this._transports().length - 1;
      if (simpler && this._levelErrors >= this.options.errorsBeforeFallback) {
        this._level++;
        this._levelErrors = 0;
        this._retryBetterAt = Date.now() + RETRY_BETTER_AFTER_MS;
        return this._schedule(0); // the next transport gets its chance at once
      }
      // Full jitter: the members of a faction whose relay restarts do not all come back at one moment.
      var o = this.options;
      var cap = reachable ? o.backoffMaxMs : Math.min(o.backoffMaxMs, o.outageRetryMaxMs);
      this._schedule(o.random() * Math.min(cap, o.backoffInitialMs * Math.pow(2, this._errors - 1)));
    }

    _schedule(delayMs) {
      var token = ++this._attempt;
      clearTimeout(this._timer);
      this._timer = setTimeout(() => {
        if (token === this._attempt && this._running) this._step();
      }, delayMs);
    }

    _log(level, text) {
      var log = this.options.log;
      if (log && typeof log[level] === 'function') log[level]('[CAT Relay] ' + text);
    }
  }

  [CATRelayClient, CATRelayClient.prototype].forEach(function (o) { Object.assign(o, STATES); });

  /* The page's faction, where today's script keeps it. */
  function pageFactionId() {
    var instance = typeof window !== 'undefined' ? window.warCallingSystemInstance : null;
    return instance ? instance.factionId : null;
  }

  /* Option A: a WebSocket stand-in for `new WebSocket(wsUrl)`. The relay is CATRelay.defaults.relayUrl
   * (the relay that served this file), the faction the page's warCallingSystemInstance.factionId, the
   * key wsUrl's apikey; `options` may name any of them and any client option. It opens by itself, as a
   * WebSocket does, unless the caller calls connect() first. */
  function createCATRelayConnection(wsUrl, options) {
    var o = Object.assign({}, options);
    var keyInUrl = /[?&]apikey=([^&]*)/.exec(String(wsUrl));
    var relayUrl = o.relayUrl || DEFAULTS.relayUrl;
    var factionId = o.factionId || pageFactionId();
    var apiKey = o.apiKey || (keyInUrl && decodeURIComponent(keyInUrl[1]));
    var missing = [!relayUrl && 'relayUrl (load /client.js from the relay, or set CATRelay.defaults.relayUrl)',
      !factionId && 'factionId (window.warCallingSystemInstance.factionId)', !apiKey && 'apiKey (apikey= in the URL)'];
    missing = missing.filter(Boolean);
    if (missing.length) throw new TypeError('createCATRelayConnection: needs ' + missing.join(', '));
    var client = new CATRelayClient(relayUrl, factionId, apiKey, o);
    client.url = String(wsUrl);
    later(function () { if (client.readyState === STATES.CONNECTING && !client._running) client.connect(); });
    return client;
  }
  Object.assign(createCATRelayConnection, STATES);

  return {
    defaults: DEFAULTS,
    CATRelayClient: CATRelayClient,
    createCATRelayConnection: createCATRelayConnection,
  };
})();
var CATRelayClient = CATRelay.CATRelayClient;
var createCATRelayConnection = CATRelay.createCATRelayConnection;
