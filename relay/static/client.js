/*
 * CAT Relay browser client: a faction's events from a CAT Relay, delivered the way today's CAT
 * userscript consumes them. A drop-in for `new CATRelayClient(relayUrl, factionId, apiKey)` and
 * `createCATRelayConnection(wsUrl)`; docs/client.md describes the API.
 *
 * Plain ES2017 without modules, so that it runs from a <script> tag, a Tampermonkey @require or text
 * injected by TornPDA. The exports are top-level `var`s: globals on a page, and names in scope for a
 * userscript that @requires it into its own wrapper.
 */
var CATRelay = (function () {
  'use strict';

  var DEFAULTS = {
    transport: 'auto', // or 'sse', 'long-poll', 'poll' to pin one
    request: null, // a GM_xmlhttpRequest-style function; SSE cannot go through it, so it long-polls
    EventSource: null, // defaults to the page's
    waitS: 25, // long-poll hold: under the relay's 30 s cap and common 30-60 s proxy idle timeouts
    backoffInitialMs: 1000,
    backoffMaxMs: 30000,
    errorsBeforeFallback: 3, // consecutive failures of one transport before trying a simpler one
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
  var FORWARDED = ['message', 'hospital_update', 'faction_members_update']; // client -> connection
  var STATES = { CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3 };

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

    // The `on…` property first, then the listeners in the order they were added.
    _emit(type, event, property) {
      if (property) invoke(this[property], this, event);
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

  class CATRelayClient extends Emitter {
    constructor(relayUrl, factionId, apiKey, options) {
      super();
      this.relayUrl = String(relayUrl).replace(/\/+$/, '');
      this.factionId = factionId;
      this.apiKey = apiKey;
      this.options = Object.assign({}, DEFAULTS, options);
      this.cursor = Date.now(); // as today's script starts; subscribe() replaces it with the relay's
      this.subscribed = false;
      this.transport = null; // 'sse' | 'long-poll' | 'poll' while delivering
      this.lastStatus = null; // of the last /subscribe; 0 when it got no answer
      this.lastError = null;
      this.onHospitalUpdate = null; // called with event.data, as today's handlers are
      this.onFactionMembersUpdate = null;
      this.onMessage = null; // called with each WebSocket-style message event
      this._running = false;
      this._connecting = null;
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
      this._keys = {}; // table -> key column, from /state
      this._stateless = false; // the relay gave no state when asked: take `truncated` answers as they are
      CATRelayClient.latest = this; // what createCATRelayConnection uses by default
    }

    /* Resolves true when the relay answers 200 with a truthy `deployed` or `status`; never rejects. */
    async ping() {
      var answer = await this._call('GET', '/ping', undefined, PING_TIMEOUT_MS).catch(function () {
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

    /* Subscribes unless already subscribed, then delivers until close(); resolves false if refused. */
    connect() {
      if (this._running) return Promise.resolve(true);
      if (!this._connecting) {
        this._connecting = (this.subscribed ? Promise.resolve(true) : this.subscribe()).then((ok) => {
          this._connecting = null;
          if (!ok) return false;
          this._running = true;
          this._errors = this._levelErrors = this._level = 0;
          this._step();
          this._emit('open', makeEvent('open', this));
          return true;
        });
      }
      return this._connecting;
    }

    /* Stops delivery. Publications already sent still complete. */
    close() {
      this._stop(1000, '', true);
    }

    /* POST /events; resolves with the relay's {status, id, timestamp}, rejects when refused. */
    async publish(type, data) {
      var payload = { faction_id: this.factionId, api_key: this.apiKey, type: type, data: data };
      var answer = await this._call('POST', '/events', payload, REQUEST_TIMEOUT_MS, false);
      if (answer.status === 200 && answer.body && answer.body.status === 'published') return answer.body;
      throw new Error('publishing ' + type + ' was refused: ' + describe(answer));
    }

    _stop(code, reason, wasClean) {
      var wasRunning = this._running;
      this._running = false;
      this._attempt++;
      clearTimeout(this._timer);
      this._closeSource();
      this._requests.splice(0).forEach(function (r) { if (r && r.abort) r.abort(); });
      this._setTransport(null);
      if (!wasRunning) return;
      this._emit('close', makeEvent('close', this, { code: code, reason: reason, wasClean: wasClean }));
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

    /* One delivery request or stream: resubscribe if the relay forgot us, then the current transport. */
    async _step() {
      var token = ++this._attempt;
      if (this._resync && !this._resubscribe) {
        // Whatever happens, carry on: without a state the retained events are still worth having.
        this._resync = false;
        var loaded = await this.loadState(true);
        if (token !== this._attempt) return;
        if (!loaded) {
          this._stateless = true;
          this._log('warn', 'events were missed and the relay gave no state to recover from');
        }
      }
      if (this._resubscribe) {
        var ok = await this.subscribe();
        if (token !== this._attempt) return;
        // A refused key or faction is final, as it is for today's script; a busy or absent relay is not.
        if (!ok && (this.lastStatus === 400 || this.lastStatus === 401)) return this._refusedForGood();
        if (!ok) return this._failed(token, new Error('subscribing failed: ' + this.lastError), false);
        this._resubscribe = false;
      }
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

    async _poll(token, waitS) {
      var started = Date.now();
      var path = '/events?faction_id=' + encodeURIComponent(this.factionId) + '&since=' + this.cursor;
      var answer;
      try {
        var timeoutMs = waitS ? waitS * 1000 + HELD_MARGIN_MS : REQUEST_TIMEOUT_MS;
        answer = await this._call('GET', path + (waitS ? '&wait=' + waitS : ''), undefined, timeoutMs);
      } catch (error) {
        return this._failed(token, error, true);
      }
      if (token !== this._attempt) return;
      var body = answer.body;
      if (answer.status !== 200 || !body || !Array.isArray(body.events)) return this._refused(token, answer);
      this._errors = this._levelErrors = 0;
      if (body.truncated === true && !this._stateless) {
        // What we missed is gone from the relay's events but not from its rows: reload them (which also
        // covers this answer's events) before going on.
        this._resync = true;
        return this._schedule(0);
      }
      this._deliver(body.events);
      // An empty answer's cursor is safe to adopt: the relay stamps every later event above it.
      if (typeof body.timestamp === 'number' && body.timestamp > this.cursor) this.cursor = body.timestamp;
      // An empty long-poll that came back early was not held (shutdown, a relay at its cap, or one that
      // ignores wait=): pausing keeps that from turning into a tight loop.
      var held = waitS && (body.events.length > 0 || Date.now() - started >= waitS * 500);
      this._schedule(held ? 0 : typeof body.next_poll_ms === 'number' ? body.next_poll_ms : LEGACY_POLL_MS);
    }

    _openStream(token) {
      var self = this, source, openedAt = 0;
      var url = this.relayUrl + '/events/stream?faction_id=' + encodeURIComponent(this.factionId) +
        '&since=' + this.cursor;
      try {
        source = new (this._eventSource())(url);
      } catch (error) {
        return this._failed(token, error, true);
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
        if (openedAt && Date.now() - openedAt >= STREAM_HEALTHY_MS) self._levelErrors = 0;
        self._failed(token, new Error('the event stream ' + (openedAt ? 'ended' : 'did not open')), true);
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

    _dispatch(event) {
      var handler = HANDLERS[event.type];
      var id = String(event.timestamp);
      if (handler) {
        invoke(this[handler], this, event.data);
        var fields = { data: event.data, lastEventId: id, event: event };
        this._emit(event.type, makeEvent(event.type, this, fields));
        return;
      }
      var data = JSON.stringify({ event: 'postgres_changes', payload: event.data });
      var origin = this.relayUrl.replace(/^(\w+:\/\/[^/]+).*$/, '$1');
      var message = makeEvent('message', this, { data: data, origin: origin, lastEventId: id });
      this._emit('message', message, 'onMessage');
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
      var transportFault = !answer.body || answer.status >= 500 || code === 'invalid_wait';
      this._failed(token, new Error('the relay answered ' + describe(answer)), transportFault);
    }

    _refusedForGood(answer) {
      if (answer) this.lastError = describe(answer);
      this._log('warn', 'the relay refused this client: ' + this.lastError);
      this._emit('error', makeEvent('error', this, { message: this.lastError, fatal: true }));
      this._stop(1008, this.lastError, false);
    }

    _failed(token, error, transportFault) {
      if (token !== this._attempt || !this._running) return;
      this.lastError = error.message;
      this._errors++;
      if (transportFault) this._levelErrors++;
      this._log('warn', error.message + ' (' + this._errors + ' in a row)');
      this._emit('error', makeEvent('error', this, { message: error.message, fatal: false }));
      var simpler = this._level < this._transports().length - 1;
      if (simpler && this._levelErrors >= this.options.errorsBeforeFallback) {
        this._level++;
        this._levelErrors = 0;
        this._retryBetterAt = Date.now() + RETRY_BETTER_AFTER_MS;
        return this._schedule(0); // the next transport gets its chance at once
      }
      // Full jitter: the members of a faction whose relay restarts do not all come back at one moment.
      var o = this.options;
      var ceiling = Math.min(o.backoffMaxMs, o.backoffInitialMs * Math.pow(2, this._errors - 1));
      this._schedule(o.random() * ceiling);
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

  /* A client update a caller may send(): {event|type: 'hospital_update', data|payload|members}, bare or
   * as a Realtime broadcast frame's payload. */
  function clientUpdate(frame) {
    if (Array.isArray(frame)) frame = { event: frame[3], payload: frame[4] }; // Phoenix v2
    var source = frame.event === 'broadcast' && frame.payload ? frame.payload : frame;
    var type = HANDLERS[source.event] ? source.event : HANDLERS[source.type] ? source.type : null;
    if (!type) return null;
    var data = 'data' in source ? source.data : 'payload' in source ? source.payload : source.members;
    return { type: type, data: data };
  }

  /* The reply a Phoenix server would give a v1 {topic, event, payload, ref} or v2 [join_ref, ref, topic,
   * event, payload] frame with a ref (heartbeat, phx_join, ...): "ok". Null for anything else. */
  function phoenixReply(frame) {
    var ok = { status: 'ok', response: {} };
    if (Array.isArray(frame) && frame.length === 5 && frame[1] != null) {
      return [frame[0], frame[1], frame[2], 'phx_reply', ok];
    }
    if (!frame || typeof frame.topic !== 'string' || typeof frame.event !== 'string' || frame.ref == null) {
      return null;
    }
    var reply = { topic: frame.topic, event: 'phx_reply', payload: ok, ref: frame.ref };
    if (frame.join_ref !== undefined) reply.join_ref = frame.join_ref;
    return reply;
  }

  /* A WebSocket look-alike over a CATRelayClient, for code written against today's relay socket. */
  class CATRelayConnection extends Emitter {
    constructor(url, client) {
      super();
      this.url = url;
      this.client = client;
      this.readyState = STATES.CONNECTING;
      this.protocol = '';
      this.extensions = '';
      this.bufferedAmount = 0;
      this.binaryType = 'blob';
      this.onopen = this.onmessage = this.onerror = this.onclose = null;
      this._queue = [];
      this._forward = (event) => {
        var copy = Object.assign({}, event, { target: this, currentTarget: this });
        this._emit(event.type, copy, 'on' + event.type);
      };
      this._clientClosed = (event) => {
        this.readyState = STATES.CLOSING;
        this._detach();
        later(() => this._finish(event.code, event.reason, event.wasClean));
      };
      later(() => this._start()); // as with a WebSocket, the caller sets its handlers first
    }

    async _start() {
      var ok = this.readyState === STATES.CONNECTING && (await this.client.connect());
      if (this.readyState !== STATES.CONNECTING) return; // closed meanwhile
      if (!ok) return this._finish(1006, 'the relay is unavailable: ' + this.client.lastError, false);
      FORWARDED.forEach(function (type) { this.client.addEventListener(type, this._forward); }, this);
      this.client.addEventListener('close', this._clientClosed);
      this.readyState = STATES.OPEN;
      this._emit('open', makeEvent('open', this), 'onopen');
      this._queue.splice(0).forEach(this.send, this);
    }

    /* Client updates are published; Phoenix frames get an "ok" reply; anything else is dropped.
     * Unlike a WebSocket, sending while CONNECTING queues rather than throws. */
    send(text) {
      if (this.readyState === STATES.CONNECTING) return void this._queue.push(text);
      if (this.readyState !== STATES.OPEN) return; // a closed WebSocket drops data too
      var frame = typeof text === 'string' ? parseJson(text) : null;
      var update = frame && clientUpdate(frame);
      var reply = frame && phoenixReply(frame);
      if (update) {
        this.client.publish(update.type, update.data).catch((error) => {
          this.client._log('warn', error.message);
          this._emit('error', makeEvent('error', this, { message: error.message }), 'onerror');
        });
      }
      if (reply) {
        var fields = { data: JSON.stringify(reply), origin: '', lastEventId: '' };
        var message = makeEvent('message', this, fields);
        later(() => { if (this.readyState === STATES.OPEN) this._emit('message', message, 'onmessage'); });
      }
      if (!update && !reply) this.client._log('warn', 'send() dropped a frame it does not know');
    }

    /* Closing the connection stops its client's delivery, as closing the socket did. */
    close(code, reason) {
      if (this.readyState >= STATES.CLOSING) return;
      this.readyState = STATES.CLOSING;
      this._detach();
      this.client.close();
      later(() => this._finish(code === undefined ? 1000 : code, reason || '', true));
    }

    _detach() {
      FORWARDED.forEach(function (type) { this.client.removeEventListener(type, this._forward); }, this);
      this.client.removeEventListener('close', this._clientClosed);
    }

    _finish(code, reason, wasClean) {
      if (this.readyState === STATES.CLOSED) return;
      this.readyState = STATES.CLOSED;
      if (!wasClean) this._emit('error', makeEvent('error', this, { message: reason }), 'onerror');
      var event = makeEvent('close', this, { code: code, reason: reason, wasClean: wasClean });
      this._emit('close', event, 'onclose');
    }
  }

  [CATRelayConnection, CATRelayConnection.prototype].forEach(function (o) { Object.assign(o, STATES); });

  /* Over the most recent CATRelayClient, unless options name relayUrl, factionId or apiKey: then over a
   * new client, the rest taken from the latest client (the key also from wsUrl's apikey parameter). */
  function createCATRelayConnection(wsUrl, options) {
    var o = options || {};
    var latest = CATRelayClient.latest;
    if (latest && !o.relayUrl && !o.factionId && !o.apiKey) return new CATRelayConnection(wsUrl, latest);
    var keyInUrl = /[?&]apikey=([^&]*)/.exec(String(wsUrl));
    var relayUrl = o.relayUrl || (latest && latest.relayUrl);
    var factionId = o.factionId || (latest && latest.factionId);
    var apiKey = o.apiKey || (latest && latest.apiKey) || (keyInUrl && decodeURIComponent(keyInUrl[1]));
    if (!relayUrl || !factionId || !apiKey) {
      throw new TypeError('createCATRelayConnection: needs a CATRelayClient, or relayUrl, factionId, apiKey');
    }
    return new CATRelayConnection(wsUrl, new CATRelayClient(relayUrl, factionId, apiKey, o));
  }
  Object.assign(createCATRelayConnection, STATES);

  return {
    CATRelayClient: CATRelayClient,
    CATRelayConnection: CATRelayConnection,
    createCATRelayConnection: createCATRelayConnection,
  };
})();
var CATRelayClient = CATRelay.CATRelayClient;
var createCATRelayConnection = CATRelay.createCATRelayConnection;
