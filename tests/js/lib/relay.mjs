// Shared helpers for the interop tests: start/stop/restart the server under test,
// poll for conditions with a deadline, temp dirs, small HTTP/WebSocket utilities.
//
// RELAY_BIN        path of the relay binary (default ../../target/debug/automerge-relay,
//                  relative to tests/js)
// RELAY_TARGET     "relay" (default) or "reference": run the automerge-repo reference sync
//                  server (reference-server.mjs) instead; relay-only tests are then skipped.

import { spawn } from "node:child_process"
import fs from "node:fs"
import os from "node:os"
import path from "node:path"
import { fileURLToPath } from "node:url"
import { setTimeout as delay } from "node:timers/promises"
import WebSocket from "ws"

const here = path.dirname(fileURLToPath(import.meta.url))
export const JS_DIR = path.resolve(here, "..")

export const TARGET = process.env.RELAY_TARGET === "reference" ? "reference" : "relay"
export const IS_REFERENCE = TARGET === "reference"
/** Pass as the `skip` option of tests that exercise relay-only features. */
export const RELAY_ONLY = IS_REFERENCE ? "relay-only feature (RELAY_TARGET=reference)" : false

export const RELAY_BIN = path.resolve(
  JS_DIR,
  process.env.RELAY_BIN || "../../target/debug/automerge-relay",
)
export const REFERENCE_SERVER = path.join(JS_DIR, "reference-server.mjs")

const START_DEADLINE_MS = 20_000
const STOP_DEADLINE_MS = 15_000
const LISTEN_LINE = /^listening on http:\/\/127\.0\.0\.1:(\d+)$/

const tempDirs = []
/** A fresh empty directory, removed when the test process exits. */
export function tempDir(prefix = "relay-test-") {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix))
  tempDirs.push(dir)
  return dir
}
process.on("exit", () => {
  for (const dir of tempDirs) {
    try {
      fs.rmSync(dir, { recursive: true, force: true })
    } catch {
      // best effort
    }
  }
})

const running = new Set()
process.on("exit", () => {
  // Never leave a server behind, whatever happened to the test.
  for (const server of running) {
    try {
      process.kill(server.pid, "SIGKILL")
    } catch {
      // already gone
    }
  }
})

/**
 * Poll `fn` until it returns a truthy value (or a promise of one) and return that value.
 * Exceptions thrown by `fn` count as "not yet"; the last one is reported on timeout.
 */
export async function waitFor(fn, { timeout = 5000, interval = 10, message } = {}) {
  const deadline = Date.now() + timeout
  let lastError
  for (;;) {
    try {
      const value = await fn()
      if (value) return value
      lastError = undefined
    } catch (e) {
      lastError = e
    }
    if (Date.now() >= deadline) {
      const what = typeof message === "function" ? message() : (message ?? fn.toString())
      const err = new Error(
        `waitFor timed out after ${timeout} ms: ${what}` +
          (lastError ? `\nlast error: ${lastError?.stack ?? lastError}` : ""),
      )
      if (lastError) err.cause = lastError
      throw err
    }
    await delay(interval)
  }
}

/** Reject if `promise` does not settle within `ms`. */
export async function withTimeout(promise, ms, what = "operation") {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not settle within ${ms} ms`)), ms)
  })
  try {
    return await Promise.race([promise, timeout])
  } finally {
    clearTimeout(timer)
  }
}

/** A server process under test (the relay binary, or the reference sync server). */
export class Relay {
  /** `args`: extra command-line arguments for the relay binary (ignored for the reference server). */
  constructor({ dataDir, target = TARGET, args = [] } = {}) {
    this.dataDir = dataDir ?? tempDir("relay-data-")
    this.target = target
    this.args = args
    this.proc = undefined
    this.port = undefined
    this.stderr = ""
    this.exitInfo = undefined
  }

  get httpUrl() {
    return `http://127.0.0.1:${this.port}`
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}`
  }

  /** `http://127.0.0.1:PORT/<p>` */
  url(p = "") {
    return `${this.httpUrl}/${p.replace(/^\//, "")}`
  }

  /** `ws://127.0.0.1:PORT/<p>` */
  ws(p = "") {
    return `${this.wsUrl}/${p.replace(/^\//, "")}`
  }

  get pid() {
    return this.proc?.pid
  }

  get running() {
    return !!this.proc && this.exitInfo === undefined
  }

  /** Start the server; `port` 0 (default) picks a free port. Resolves once it listens. */
  async start({ port = 0 } = {}) {
    if (this.running) throw new Error("server already running")
    let cmd, args
    if (this.target === "reference") {
      cmd = process.execPath
      args = [REFERENCE_SERVER, "--port", String(port), "--data-dir", this.dataDir]
    } else {
      if (!fs.existsSync(RELAY_BIN)) {
        throw new Error(`relay binary not found at ${RELAY_BIN} (set RELAY_BIN)`)
      }
      cmd = RELAY_BIN
      args = ["serve", "--listen", `127.0.0.1:${port}`, "--data-dir", this.dataDir, ...this.args]
    }
    this.stderr = ""
    this.exitInfo = undefined
    const proc = spawn(cmd, args, {
      cwd: JS_DIR,
      env: { ...process.env, RUST_LOG: "warn" },
      stdio: ["ignore", "pipe", "pipe"],
    })
    this.proc = proc
    this._server = { pid: proc.pid }
    running.add(this._server)
    this.exited = new Promise(resolve => {
      proc.once("exit", (code, signal) => {
        this.exitInfo = { code, signal }
        running.delete(this._server)
        resolve(this.exitInfo)
      })
    })
    proc.stderr.setEncoding("utf8")
    proc.stderr.on("data", chunk => {
      this.stderr += chunk
      if (this.stderr.length > 200_000) this.stderr = this.stderr.slice(-100_000)
      if (process.env.RELAY_TEST_VERBOSE) process.stderr.write(chunk)
    })
    proc.stdout.setEncoding("utf8")

    const port_ = await new Promise((resolve, reject) => {
      let buf = ""
      let done = false
      const finish = (err, value) => {
        if (done) return
        done = true
        clearTimeout(timer)
        proc.off("error", onError)
        if (err) reject(err)
        else resolve(value)
      }
      const onError = e => finish(new Error(`failed to spawn ${cmd}: ${e.message}`))
      const timer = setTimeout(() => {
        finish(
          new Error(
            `server did not print its listening line within ${START_DEADLINE_MS} ms\n` +
              `stdout so far: ${JSON.stringify(buf)}\nstderr:\n${this.stderr}`,
          ),
        )
        try {
          proc.kill("SIGKILL")
        } catch {}
      }, START_DEADLINE_MS)
      proc.once("error", onError)
      proc.stdout.on("data", chunk => {
        if (done) {
          if (process.env.RELAY_TEST_VERBOSE) process.stdout.write(chunk)
          return
        }
        buf += chunk
        let nl
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl).replace(/\r$/, "")
          buf = buf.slice(nl + 1)
          const m = LISTEN_LINE.exec(line)
          if (m) return finish(null, Number(m[1]))
        }
      })
      this.exited.then(({ code, signal }) => {
        // Give stderr a moment to drain before reporting.
        setImmediate(() =>
          finish(
            new Error(
              `server exited before listening (code ${code}, signal ${signal})\n` +
                `stdout: ${JSON.stringify(buf)}\nstderr:\n${this.stderr}`,
            ),
          ),
        )
      })
    })
    this.port = port_
    return this
  }

  /**
   * Stop the server with `signal` (SIGTERM: graceful; SIGKILL: crash) and wait for it to exit.
   * Resolves to `{code, signal}`.
   */
  async stop(signal = "SIGTERM") {
    if (!this.proc) return undefined
    if (this.exitInfo) return this.exitInfo
    this.proc.kill(signal)
    let timer
    const timedOut = new Promise(resolve => {
      timer = setTimeout(() => resolve("timeout"), STOP_DEADLINE_MS)
    })
    const r = await Promise.race([this.exited, timedOut])
    clearTimeout(timer)
    if (r === "timeout") {
      this.proc.kill("SIGKILL")
      await this.exited
      throw new Error(
        `server did not exit within ${STOP_DEADLINE_MS} ms of ${signal}\nstderr:\n${this.stderr}`,
      )
    }
    return this.exitInfo
  }

  /** Stop and start again on the same data dir (and, with samePort, the same port). */
  async restart({ signal = "SIGTERM", samePort = false } = {}) {
    const oldPort = this.port
    await this.stop(signal)
    await this.start({ port: samePort ? oldPort : 0 })
    return this
  }
}

/** Start a server (relay or reference per RELAY_TARGET) on a fresh data dir. */
export async function startRelay(opts = {}) {
  const relay = new Relay(opts)
  await relay.start(opts)
  return relay
}

/** A unique, valid plain document id for HTTP tests. */
let counter = 0
export function uniqueId(prefix = "doc") {
  return `${prefix}-${process.pid}-${Date.now().toString(36)}-${(counter++).toString(36)}`
}

/** Body of a fetch Response as a Uint8Array. */
export async function bytes(res) {
  return new Uint8Array(await res.arrayBuffer())
}

/**
 * A WebSocket client that records every message, for per-document WebSocket tests.
 * `messages` holds {binary: bool, data: Uint8Array|string}; `next(pred)` waits for one.
 */
export class WsClient {
  constructor(url) {
    this.url = url
    this.messages = []
    this.closeInfo = undefined
    this.errors = []
    this.ws = new WebSocket(url)
    this.ws.binaryType = "nodebuffer"
    this.ws.on("message", (data, isBinary) => {
      if (isBinary) {
        const buf = Buffer.isBuffer(data) ? data : Buffer.concat(data)
        this.messages.push({ binary: true, data: new Uint8Array(buf) })
      } else {
        this.messages.push({ binary: false, data: data.toString("utf8") })
      }
    })
    this.closed = new Promise(resolve => {
      this.ws.on("close", (code, reason) => {
        this.closeInfo = { code, reason: reason.toString("utf8") }
        resolve(this.closeInfo)
      })
    })
    this.ws.on("error", e => this.errors.push(e))
    this.opened = new Promise((resolve, reject) => {
      this.ws.once("open", resolve)
      this.ws.once("unexpected-response", (_req, res) =>
        reject(new Error(`WebSocket upgrade refused: HTTP ${res.statusCode}`)),
      )
      this.ws.once("error", reject)
      this.ws.once("close", () => reject(new Error("WebSocket closed before opening")))
    })
  }

  static async connect(url) {
    const c = new WsClient(url)
    await c.opened
    return c
  }

  /** Messages received so far that match `pred`, starting at index `from`. */
  find(pred, from = 0) {
    for (let i = from; i < this.messages.length; i++) {
      if (pred(this.messages[i])) return { index: i, ...this.messages[i] }
    }
    return undefined
  }

  /** Wait for a message (index >= from) matching pred. */
  async next(pred = () => true, { from = 0, timeout = 5000, message } = {}) {
    return waitFor(() => this.find(pred, from), {
      timeout,
      message: message ?? `WebSocket message matching ${pred}`,
    })
  }

  /** Text messages parsed as JSON (unparseable ones as {raw}). */
  json(from = 0) {
    return this.messages
      .slice(from)
      .filter(m => !m.binary)
      .map(m => {
        try {
          return JSON.parse(m.data)
        } catch {
          return { raw: m.data }
        }
      })
  }

  send(data) {
    this.ws.send(data)
  }

  async close() {
    if (this.ws.readyState === WebSocket.CLOSED) return this.closeInfo
    if (this.ws.readyState !== WebSocket.CLOSING) this.ws.close()
    let timer
    const r = await Promise.race([
      this.closed,
      new Promise(resolve => {
        timer = setTimeout(() => resolve("timeout"), 2000)
      }),
    ])
    clearTimeout(timer)
    if (r === "timeout") this.ws.terminate()
    return this.closeInfo
  }
}

/** Parse a JSON text WebSocket message (or return undefined). */
export function parseJson(msg) {
  if (!msg || msg.binary) return undefined
  try {
    return JSON.parse(msg.data)
  } catch {
    return undefined
  }
}

