// A QA system's verdict consumer in Node.js (npm install redis@4).
// Usage: node verdict-consumer.mjs redis://host:6379 LINE [STOP_AFTER]
import { createClient } from "redis";

const [url, line, stopAfter] = process.argv.slice(2);
const stream = `verdicts:{${line}}`; // the braces: the line is the key's Redis Cluster hash tag
const group = "qa-system"; // one group per consuming system: each gets every verdict
const consumer = "qa-1"; // several consumers in a group share the work

const client = createClient({ url });
await client.connect();
try {
  await client.xGroupCreate(stream, group, "0", { MKSTREAM: true }); // "0": from the start
} catch (err) {
  if (!String(err).includes("BUSYGROUP")) throw err; // the group already exists
}

let seen = 0;
while (!stopAfter || seen < Number(stopAfter)) {
  const reply = await client.xReadGroup(group, consumer, { key: stream, id: ">" }, { COUNT: 10, BLOCK: 2000 });
  for (const { id, message } of reply?.[0]?.messages ?? []) {
    // Entry fields: kind, v (schema version), meta (JSON, see verdict.v3.schema.json).
    // Version 2 added each view's defect regions, version 3 their outlines; each verdict is
    // written at the oldest version that holds it (one without regions as version 1).
    if (message.kind === "verdict" && ["1", "2", "3"].includes(message.v)) {
      const v = JSON.parse(message.meta);
      const bad = v.views.filter((r) => r.is_defect).map((r) => r.camera);
      const where = v.views.flatMap((r) => (r.regions ?? []).map((g) => ({ camera: r.camera, ...g.frame_box, ...(g.frame_outline ? { outline: g.frame_outline } : {}) })));
      console.log(JSON.stringify({ id, product: v.product_id, decision: v.decision, status: v.status, defective_views: bad, regions: where }));
    }
    await client.xAck(stream, group, id); // acknowledged only once handled
    seen += 1;
  }
}
await client.quit();
