// A recsys client in another language, built from protos/ alone: loads recommender.proto at run time with
// @grpc/proto-loader (no generated code, nothing from the Python package) and runs a list of calls.
//
//   node client.js TARGET PROTO_ROOT < calls.json > results.json
//
// calls.json: [{"service": "Recommender", "method": "Recommend", "request": {...}, "metadata": {"k": "v"}}, ...]
// results.json: one entry per call, in order: {"ok": true, "response": {...}} or
// {"ok": false, "code": <grpc status number>, "codeName": "INVALID_ARGUMENT", "details": "..."}.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

async function main() {
  const [target, protoRoot] = process.argv.slice(2);
  if (!target || !protoRoot) {
    console.error("usage: node client.js TARGET PROTO_ROOT < calls.json");
    process.exit(2);
  }
  const definition = protoLoader.loadSync(path.join(protoRoot, "recsys/v1/recommender.proto"), {
    includeDirs: [protoRoot],
    keepCase: true, // field names exactly as in the .proto (user_id, not userId)
    enums: String, // enum values by name ("SOURCE_KNOWN_USER")
    longs: String,
    defaults: true, // unset scalars appear with their default, as in every other language's generated code
  });
  const v1 = grpc.loadPackageDefinition(definition).recsys.v1;
  const calls = JSON.parse(require("fs").readFileSync(0, "utf8"));
  const clients = {};
  const codeName = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));
  const results = [];
  for (const call of calls) {
    const Service = v1[call.service];
    if (!Service) throw new Error(`no service ${call.service} in the proto`);
    clients[call.service] ??= new Service(target, grpc.credentials.createInsecure());
    const client = clients[call.service];
    if (typeof client[call.method] !== "function") throw new Error(`no method ${call.service}.${call.method}`);
    const md = new grpc.Metadata();
    for (const [k, v] of Object.entries(call.metadata || {})) md.set(k, v);
    const deadline = new Date(Date.now() + 10000);
    results.push(
      await new Promise((resolve) => {
        client[call.method](call.request || {}, md, { deadline }, (err, response) => {
          if (err) resolve({ ok: false, code: err.code, codeName: codeName[err.code], details: err.details });
          else resolve({ ok: true, response });
        });
      }),
    );
  }
  for (const c of Object.values(clients)) c.close();
  process.stdout.write(JSON.stringify(results));
}

main().catch((e) => {
  console.error(e.stack || String(e));
  process.exit(1);
});
