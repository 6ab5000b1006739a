// The predecessor's relay, as a benchmark peer for bench/shortpoll.py: every faction's events in an
// in-memory list, and GET /events?faction_id=&since= answering the ones stamped after `since`.
//
//   node server.js --seed seed.json [--port 0] [--host 127.0.0.1]
//
// seed.json: {"<faction_id>": [<event as the relay serves it>, ...], ...}, oldest first, each event
// carrying its `timestamp` (the relay's cursor). The answer has the relay's shape
// ({"events", "timestamp", "next_poll_ms"}) so both servers can be checked against each other. Prints
// "listening on http://HOST:PORT" once it accepts connections; exits on SIGTERM or SIGINT.
"use strict";

const fs = require("node:fs");
const express = require("express");

// The relay's advice to pollers while a faction is active; the predecessor gave none.
const NEXT_POLL_MS = 1000;
const FACTION_ID = /^[0-9]{1,10}$/;
const SINCE = /^[0-9]+$/;

function option(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at >= 0 && at + 1 < process.argv.length ? process.argv[at + 1] : fallback;
}

function loadSeed(path) {
  const seed = JSON.parse(fs.readFileSync(path, "utf8"));
  const factions = new Map();
  for (const [factionId, events] of Object.entries(seed)) {
    factions.set(Number(factionId), events);
  }
  return factions;
}

function fail(res, status, code, message) {
  res.status(status).json({ error: message, code });
}

function createApp(factions) {
  const app = express();
  app.use((req, res, next) => {
    res.set("Access-Control-Allow-Origin", "*");
    next();
  });

  app.get("/ping", (req, res) => {
    res.json({ status: "ok", deployed: true, online: true, version: "predecessor" });
  });

  app.get("/events", (req, res) => {
    const factionText = req.query.faction_id;
    if (typeof factionText !== "string" || !FACTION_ID.test(factionText)) {
      return fail(res, 400, "invalid_faction_id", "faction_id must be a positive integer");
    }
    const events = factions.get(Number(factionText));
    if (events === undefined) {
      return fail(res, 404, "not_subscribed", `faction ${factionText} is not subscribed`);
    }
    const sinceText = req.query.since;
    if (sinceText !== undefined && sinceText !== "" && (typeof sinceText !== "string" || !SINCE.test(sinceText))) {
      return fail(res, 400, "invalid_since", "since must be a timestamp in milliseconds");
    }
    const since = sinceText ? Number(sinceText) : 0;
    const found = events.filter((event) => event.timestamp > since);
    const timestamp = found.length ? found[found.length - 1].timestamp : since || Date.now();
    res.json({ events: found, timestamp, next_poll_ms: NEXT_POLL_MS });
  });

  app.use((req, res) => fail(res, 404, "not_found", "no such path"));
  return app;
}

function main() {
  const seedPath = option("seed", null);
  if (!seedPath) {
    console.error("usage: node server.js --seed seed.json [--port 0] [--host 127.0.0.1]");
    process.exit(2);
  }
  const factions = loadSeed(seedPath);
  const host = option("host", "127.0.0.1");
  const server = createApp(factions).listen(Number(option("port", "0")), host, () => {
    const { port } = server.address();
    console.log(`listening on http://${host}:${port} with ${factions.size} factions`);
  });
  server.keepAliveTimeout = 5000; // the relay's (hypercorn keep_alive_timeout)
  const stop = () => server.close(() => process.exit(0));
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main();
