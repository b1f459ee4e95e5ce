// The relay's dashboard (`/_/`) in Debian's chromium: a protected relay with a few documents,
// opened with an admin token in the page's URL; search finds a document, clicking it shows its
// JSON and its history. A screenshot goes to test-artifacts/dashboard.png.
//
//   npm test                      (from client-example/, with the browser test)
//   RELAY_BIN=/path/to/automerge-relay npm test
import { test, before, after } from "node:test"
import assert from "node:assert/strict"
import { spawn } from "node:child_process"
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { dirname, join, resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { chromium } from "playwright-core"
import * as Automerge from "@automerge/automerge"

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..")
const RELAY_BIN = resolve(root, process.env.RELAY_BIN ?? "../target/debug/automerge-relay")
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium"
const ARTIFACTS = join(root, "test-artifacts")
const CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
const ADMIN = "dashboard-admin-3e1f9a7c5b2d4f6081a3c5e7f9b1d3e5"

let dir, relay, browser

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "relay-dashboard-"))
  const tokens = join(dir, "tokens.toml")
  writeFileSync(tokens, `[[token]]\nname = "dashboard-admin"\ntoken = "${ADMIN}"\ngrants = [ { ids = "*", access = "admin" } ]\n`)
  relay = await new Promise((resolvePromise, reject) => {
    const child = spawn(RELAY_BIN, ["--listen", "127.0.0.1:0", "--data-dir", join(dir, "data"), "--auth-tokens", tokens],
      { stdio: ["ignore", "pipe", "pipe"] })
    let out = ""
    const timer = setTimeout(() => { child.kill("SIGKILL"); reject(new Error(`relay did not start:\n${out}`)) }, 30_000)
    const onData = chunk => {
      out += chunk
      const m = out.match(/listening on (http:\/\/[\d.:]+)/)
      if (m) { clearTimeout(timer); resolvePromise({ child, url: m[1] }) }
    }
    child.stdout.on("data", onData)
    child.stderr.on("data", onData)
    child.on("exit", code => reject(new Error(`relay exited with ${code}:\n${out}`)))
  })
  const post = async (id, doc) => {
    const res = await fetch(`${relay.url}/${id}`, { method: "POST", body: Automerge.save(doc),
      headers: { Authorization: `Bearer ${ADMIN}` } })
    assert.equal(res.status, 201, `POST /${id}`)
  }
  let groceries = Automerge.from({ title: "Groceries", items: [{ text: "milk", done: false }, { text: "eggs", done: true }] })
  groceries = Automerge.change(groceries, { message: "buy bread too" }, d => { d.items.push({ text: "bread", done: false }) })
  await post("groceries-list", groceries)
  await post("team-board", Automerge.from({ columns: ["todo", "doing", "done"], cards: 12 }))
  await post("notes-2026", Automerge.from({ text: "hello from the relay" }))
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS })
})

after(async () => {
  await browser?.close()
  if (relay) {
    const exited = new Promise(r => relay.child.once("exit", r))
    process.kill(relay.child.pid, "SIGTERM")
    await exited
  }
  if (dir) rmSync(dir, { recursive: true, force: true })
})

test("the dashboard finds a document by search and shows its JSON and history", { timeout: 60_000 }, async () => {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } })
  const errors = []
  page.on("pageerror", e => errors.push(e.message))
  await page.goto(`${relay.url}/_/?token=${ADMIN}`)
  await page.waitForSelector("#ready.ok", { timeout: 10_000 })
  await page.waitForSelector('tr.doc[data-id="team-board"]', { timeout: 10_000 })
  assert.equal(await page.locator("tr.doc").count(), 3)

  await page.fill("#search", "groc")
  await page.waitForFunction(() => document.querySelectorAll("tr.doc").length === 1, null, { timeout: 10_000 })
  await page.click('tr.doc[data-id="groceries-list"]')
  await page.waitForSelector("#json", { timeout: 10_000 })
  const shown = JSON.parse(await page.locator("#json").innerText())
  assert.deepEqual(shown, { title: "Groceries", items: [{ text: "milk", done: false }, { text: "eggs", done: true }, { text: "bread", done: false }] })

  mkdirSync(ARTIFACTS, { recursive: true })
  await page.screenshot({ path: join(ARTIFACTS, "dashboard.png"), fullPage: true })

  await page.click('.tabs button[data-tab="history"]')
  await page.waitForSelector("#history tr", { timeout: 10_000 })
  assert.equal(await page.locator("#history tr").count(), 2)
  assert.match(await page.locator("#history tr").first().innerText(), /buy bread too/)
  await page.screenshot({ path: join(ARTIFACTS, "dashboard-history.png"), fullPage: true })

  // Without the token the page is refused, as every admin route.
  const refused = await fetch(`${relay.url}/_/`)
  assert.equal(refused.status, 401)
  assert.deepEqual(errors, [])
})
