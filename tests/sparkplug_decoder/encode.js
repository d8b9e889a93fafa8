// Encodes Sparkplug B payloads with Eclipse Tahu's JavaScript codec (npm sparkplug-payload),
// for tests/test_sparkplug_decoders.py: commands as a host built on Tahu would write them.
//
// stdin: a JSON array of payloads as Tahu's encodePayload takes them ({timestamp, metrics:
// [{name, type, value}]}). stdout: a JSON array of the encoded payloads, base64.
"use strict";

const sparkplug = require("sparkplug-payload").get("spBv1.0");

const chunks = [];
process.stdin.on("data", (chunk) => chunks.push(chunk));
process.stdin.on("end", () => {
  const payloads = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  const encoded = payloads.map((p) => Buffer.from(sparkplug.encodePayload(p)).toString("base64"));
  process.stdout.write(JSON.stringify(encoded));
});
