// A controller API client in another language than the controller's, as a user would write one: the
// .proto files loaded with protos/ as the only include path, plain JavaScript objects as messages, mTLS
// with a certificate from the vmrepl CA. Run by tests/integration/test_node_client.py.
//
// usage: node job_client.js ADDRESS CERTS_DIR JOB_ID
// Reads a JSON object from standard input: {"job": <Job as a plain object>, "bad_job": <Job>}.
// Creates `job` as JOB_ID, reads it back, and tries to create `bad_job` as JOB_ID-bad; prints one JSON
// object: {"created": <Job>, "read": <Job>, "bad": {"code": <status name>, "details": <message>}}.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const protos = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "protos");

function loadService() {
  const definition = protoLoader.loadSync("vmrepl/v1/controller.proto", {
    includeDirs: [protos],
    keepCase: true, // field names as in the .proto files
    enums: String, // enum values by name, as a user reads them
    longs: String,
    defaults: false, // an unset field stays absent, so the round trip shows what was stored
  });
  return grpc.loadPackageDefinition(definition).vmrepl.v1.ControllerService;
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 30_000 }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

async function main() {
  const [address, certsDir, jobId] = process.argv.slice(2);
  const input = JSON.parse(fs.readFileSync(0, "utf8"));
  const read = (name) => fs.readFileSync(path.join(certsDir, name));
  const credentials = grpc.credentials.createSsl(read("ca.pem"), read("operator.key"), read("operator.pem"));
  const ControllerService = loadService();
  const client = new ControllerService(address, credentials);
  try {
    const created = await call(client, "CreateJob", { job_id: jobId, job: input.job });
    const readBack = await call(client, "GetJob", { name: `jobs/${jobId}` });
    let bad = null;
    try {
      await call(client, "CreateJob", { job_id: `${jobId}-bad`, job: input.bad_job });
    } catch (err) {
      bad = { code: grpc.status[err.code], details: err.details };
    }
    process.stdout.write(JSON.stringify({ created, read: readBack, bad }));
  } finally {
    client.close();
  }
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
