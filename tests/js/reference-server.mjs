#!/usr/bin/env node
// Reference automerge-repo sync server, in the style of automerge-repo-sync-server:
// a Repo with the WebSocket server adapter on a `ws` WebSocketServer, NodeFS storage,
// and a share policy that never announces documents.
//
// Used by the interop tests (RELAY_TARGET=reference) and by benchmarks as the baseline.
//
// Usage: node reference-server.mjs [--port PORT] [--host 127.0.0.1] [--data-dir DIR | DIR]
//   PORT defaults to env PORT, then 3030 (0 picks a free port).
//   DIR defaults to env DATA_DIR, then ./reference-data.
// Once bound it prints exactly one line to stdout: `listening on http://HOST:PORT`.
// SIGINT/SIGTERM: close sockets, flush storage, exit 0.

import http from "node:http"
import os from "node:os"
import { WebSocketServer } from "ws"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketServerAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"

function parseArgs(argv) {
  const out = {
    port: process.env.PORT ?? "3030",
    host: process.env.HOST ?? "127.0.0.1",
    dataDir: process.env.DATA_DIR ?? "./reference-data",
  }
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]
    const value = () => {
      const v = argv[++i]
      if (v === undefined) usage(`missing value for ${arg}`)
      return v
    }
    if (arg === "--port" || arg === "-p") out.port = value()
    else if (arg.startsWith("--port=")) out.port = arg.slice(7)
    else if (arg === "--host") out.host = value()
    else if (arg.startsWith("--host=")) out.host = arg.slice(7)
    else if (arg === "--data-dir") out.dataDir = value()
    else if (arg.startsWith("--data-dir=")) out.dataDir = arg.slice(11)
    else if (arg === "--help" || arg === "-h") usage(null)
    else if (!arg.startsWith("-")) out.dataDir = arg
    else usage(`unknown argument ${arg}`)
  }
  const port = Number(out.port)
  if (!Number.isInteger(port) || port < 0 || port > 65535) usage(`bad port ${out.port}`)
  return { ...out, port }
}

function usage(error) {
  const text =
    "usage: node reference-server.mjs [--port PORT] [--host HOST] [--data-dir DIR | DIR]\n"
  if (error) {
    process.stderr.write(`${error}\n${text}`)
    process.exit(2)
  }
  process.stdout.write(text)
  process.exit(0)
}

const { port, host, dataDir } = parseArgs(process.argv.slice(2))

const server = http.createServer((req, res) => {
  res.writeHead(200, { "content-type": "text/plain" })
  res.end("automerge-repo reference sync server is running\n")
})
const wss = new WebSocketServer({ noServer: true })
server.on("upgrade", (request, socket, head) => {
  wss.handleUpgrade(request, socket, head, ws => wss.emit("connection", ws, request))
})

const repo = new Repo({
  network: [new WebSocketServerAdapter(wss)],
  storage: new NodeFSStorageAdapter(dataDir),
  peerId: `reference-server-${os.hostname()}`,
  // Like the official sync server: never announce documents to peers.
  sharePolicy: async () => false,
})

// The Repo hands the network adapter its peer id only once the storage id has been read
// (NetworkSubsystem.peerMetadata); until then the adapter has no "connection" listener and
// a client's `join` would be dropped. Only listen once the adapter is wired up.
await repo.networkSubsystem.peerMetadata
await new Promise(resolve => setImmediate(resolve))

server.listen(port, host, () => {
  const addr = server.address()
  process.stdout.write(`listening on http://${host}:${addr.port}\n`)
})

let stopping = false
async function shutdown() {
  if (stopping) return
  stopping = true
  for (const client of wss.clients) client.terminate()
  wss.close()
  server.close()
  try {
    await repo.shutdown()
  } catch (e) {
    process.stderr.write(`error during shutdown: ${e?.stack ?? e}\n`)
    process.exit(1)
  }
  // Do not process.exit() here: a throttled save may still be writing (flush() skips a document
  // whose heads an in-flight save already recorded). Let pending I/O drain; exit when idle,
  // or after a grace period at the latest.
  setTimeout(() => process.exit(0), 5000).unref()
}
process.on("SIGTERM", shutdown)
process.on("SIGINT", shutdown)
