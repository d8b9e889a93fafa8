// Decodes Sparkplug B payloads with Eclipse Tahu's JavaScript codec (npm sparkplug-payload),
// for tests/test_sparkplug_decoders.py: a decoder this project did not write.
//
// stdin: a JSON array of base64 payloads. stdout: a JSON array of what Tahu decoded, as Tahu
// returns it, made JSON-safe without losing what a consumer would see: a 64-bit Long becomes
// {"long": "<decimal>"}, undefined becomes {"undefined": true} (JSON has neither).
"use strict";

const sparkplug = require("sparkplug-payload").get("spBv1.0");
const Long = require("long");

function plain(value) {
  if (value === undefined) return { undefined: true };
  if (value === null) return null;
  if (Long.isLong(value)) return { long: value.toString() };
  if (typeof value === "number" && !Number.isFinite(value)) return { number: String(value) };
  if (Array.isArray(value)) return value.map(plain);
  if (typeof value === "object" && !(value instanceof Uint8Array)) {
    const out = {};
    for (const key of Object.keys(value)) out[key] = plain(value[key]);
    return out;
  }
  return value;
}

const chunks = [];
process.stdin.on("data", (chunk) => chunks.push(chunk));
process.stdin.on("end", () => {
  const payloads = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  const decoded = payloads.map((b64) => {
    const payload = sparkplug.decodePayload(Buffer.from(b64, "base64"));
    // Every key Tahu sets on a metric, "value" included even where Tahu left it undefined.
    const metrics = (payload.metrics || []).map((m) => ({ ...plain(m), value: plain(m.value) }));
    return { ...plain(payload), metrics };
  });
  process.stdout.write(JSON.stringify(decoded));
});
