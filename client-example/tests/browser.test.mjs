// Browser test of the todo app against a real relay, in Debian's chromium.
//
//   npm test                      (from client-example/)
//   RELAY_BIN=/path/to/automerge-relay npm test
//   CHROMIUM=/path/to/chromium npm test
//   RELAY_TEST_VERBOSE=1 npm test   (echo the relay's and vite's output)
//
// It builds the app, serves it with `vite preview` and starts the relay, each
// on a free loopback port, and drives two isolated browser contexts. The page
// and the relay are on different origins, so CORS is exercised for real. The
// relay is protected (--auth-tokens with a temporary token file): pages present
// a token from the share link or the settings, as a real deployment would.
import { test, before, after } from "node:test"
import assert from "node:assert/strict"
import { spawn, spawnSync } from "node:child_process"
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { dirname, join, resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { chromium } from "playwright-core"
import { generateAutomergeUrl, parseAutomergeUrl } from "@automerge/automerge-repo"
import * as Automerge from "@automerge/automerge"

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..")
const RELAY_BIN = resolve(root, process.env.RELAY_BIN ?? "../target/debug/automerge-relay")
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium"
const ARTIFACTS = join(root, "test-artifacts")
const CHROMIUM_ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
  "--no-first-run", "--disable-component-update", "--disable-sync",
]
const SYNC_TIMEOUT = 10_000 // "within a few seconds", with room for a slow CI machine
const START_TIMEOUT = 30_000

// The relay's tokens: the test reads with ADMIN, the pages sync with WRITER
// (or READER, read-only).
const ADMIN = "browser-admin-5f1e2d3c4b5a69788796a5b4c3d2e1f0"
const WRITER = "browser-writer-0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d"
const READER = "browser-reader-7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a29"

let dataDir
let tokenFile
let relay // { child, url }
let preview // { child, url }
let browser
const pageErrors = []

// ---- processes ---------------------------------------------------------------

// Spawn a process and wait (with a deadline) until a line of its output matches `pattern`.
function startProcess(command, args, pattern, options = {}) {
  const child = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"], ...options })
  let output = ""
  return new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => fail(new Error(`timed out waiting for ${pattern}`)), START_TIMEOUT)
    function fail(err) {
      clearTimeout(timer)
      child.kill("SIGKILL")
      reject(new Error(`${command} ${args.join(" ")}: ${err.message}\n${output}`))
    }
    const onData = (chunk) => {
      if (process.env.RELAY_TEST_VERBOSE) process.stderr.write(chunk)
      output += chunk
      const match = output.match(pattern)
      if (match) {
        clearTimeout(timer)
        resolvePromise({ child, url: match[1] })
      }
    }
    child.stdout.on("data", onData)
    child.stderr.on("data", onData)
    child.on("error", fail)
    child.on("exit", (code) => fail(new Error(`exited with ${code}`)))
  })
}

async function stopProcess(proc) {
  if (!proc || proc.child.exitCode !== null || proc.child.signalCode !== null) return
  const exited = new Promise((r) => proc.child.once("exit", r))
  process.kill(proc.child.pid, "SIGTERM")
  const timer = setTimeout(() => proc.child.exitCode === null && process.kill(proc.child.pid, "SIGKILL"), 10_000)
  await exited
  clearTimeout(timer)
}

const startRelay = () =>
  startProcess(RELAY_BIN, ["serve", "--listen", "127.0.0.1:0", "--data-dir", dataDir, "--auth-tokens", tokenFile],
    /listening on (http:\/\/[\d.:]+)/)

function writeTokenFile(dir) {
  const entry = (name, token, access) =>
    `[[token]]\nname = "${name}"\ntoken = "${token}"\ngrants = [ { ids = "*", access = "${access}" } ]\n\n`
  const file = join(dir, "tokens.toml")
  writeFileSync(file, entry("browser-admin", ADMIN, "admin") + entry("browser-writer", WRITER, "write") +
    entry("browser-reader", READER, "read"))
  return file
}

// The todo titles the relay holds for a list (read with the admin token); [] when it has none.
async function relayTitles(listId) {
  const res = await fetch(`${relay.url}/${listId}`, { headers: { Authorization: `Bearer ${ADMIN}` } })
  if (res.status === 404) return []
  assert.equal(res.status, 200, `admin GET /${listId}`)
  const doc = Automerge.load(new Uint8Array(await res.arrayBuffer()))
  return (doc.todos ?? []).map((t) => t.title).sort()
}

// ---- the app, through the browser --------------------------------------------

const newListId = () => parseAutomergeUrl(generateAutomergeUrl()).documentId

async function newContext() {
  const context = await browser.newContext({ viewport: { width: 620, height: 760 } })
  context.on("page", (page) => page.on("pageerror", (err) => pageErrors.push(`${page.url()}: ${err.message}`)))
  return context
}

// A share link: the list, the sync settings and (unless null) the token.
const linkTo = (mode, listId, token = WRITER) =>
  `${preview.url}/?mode=${mode}&relay=${encodeURIComponent(relay.url)}#` +
  new URLSearchParams(token === null ? { doc: listId } : { doc: listId, token }).toString()

async function openList(context, mode, listId, { token = WRITER, status = "online" } = {}) {
  const page = await context.newPage()
  await page.goto(linkTo(mode, listId, token))
  await waitForStatus(page, status)
  return page
}

// Poll `fn` (up to the deadline) until it is truthy.
const waitFor = async (fn, what, timeout = SYNC_TIMEOUT) => {
  const deadline = Date.now() + timeout
  while (!(await fn())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 100))
  }
}

const waitForStatus = (page, status, timeout = SYNC_TIMEOUT) =>
  page.waitForSelector(`#status[data-status="${status}"]`, { timeout })

async function addTodos(page, titles) {
  for (const title of titles) {
    await page.fill("#new-title", title)
    await page.press("#new-title", "Enter")
  }
}

const todoRow = (page, title) => page.locator("#todos .todo", { has: page.locator(".title", { hasText: title }) })

// The list as the page shows it: ["title", "title ✓", ...] sorted.
const shown = (page) =>
  page.$$eval("#todos .todo", (rows) =>
    rows.map((r) => `${r.querySelector(".title")?.textContent}${r.classList.contains("done") ? " ✓" : ""}`).sort(),
  )

// Poll the page (up to the deadline) until it shows exactly `expected`.
async function waitForList(page, expected, timeout = SYNC_TIMEOUT) {
  const want = [...expected].sort()
  try {
    await page.waitForFunction(
      (want) => {
        const got = [...document.querySelectorAll("#todos .todo")]
          .map((r) => `${r.querySelector(".title")?.textContent}${r.classList.contains("done") ? " ✓" : ""}`)
          .sort()
        return JSON.stringify(got) === JSON.stringify(want)
      },
      want,
      { timeout, polling: 100 },
    )
  } catch (err) {
    assert.deepEqual(await shown(page), want, `${page.url()} did not converge: ${err.message}`)
  }
}

// ---- setup -------------------------------------------------------------------

before(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`chromium not found at ${CHROMIUM}: install Debian's chromium with \`apt-get install -y chromium\` (or set CHROMIUM=/path/to/chromium)`)
  }
  if (!existsSync(RELAY_BIN)) {
    throw new Error(`relay binary not found at ${RELAY_BIN}: build it with \`cargo build\` at the repository root, or set RELAY_BIN`)
  }
  const vite = join(root, "node_modules", "vite", "bin", "vite.js")
  const build = spawnSync(process.execPath, [vite, "build", "--logLevel", "warn"], { cwd: root, encoding: "utf8" })
  assert.equal(build.status, 0, `vite build failed:\n${build.stdout}\n${build.stderr}`)

  dataDir = mkdtempSync(join(tmpdir(), "relay-browser-test-"))
  tokenFile = writeTokenFile(mkdtempSync(join(tmpdir(), "relay-browser-tokens-")))
  relay = await startRelay()
  preview = await startProcess(
    process.execPath,
    [vite, "preview", "--host", "127.0.0.1", "--port", "0", "--strictPort"],
    /Local:\s+(http:\/\/127\.0\.0\.1:\d+)/,
    { cwd: root, env: { ...process.env, NO_COLOR: "1" } },
  )
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS })
})

after(async () => {
  await browser?.close()
  await stopProcess(preview)
  await stopProcess(relay)
  if (dataDir) rmSync(dataDir, { recursive: true, force: true })
  if (tokenFile) rmSync(dirname(tokenFile), { recursive: true, force: true })
})

// ---- tests ---------------------------------------------------------------------

const lists = {} // mode -> { id, todos } left by the offline tests, reloaded after the restart

for (const mode of ["ws", "repo"]) {
  test(`${mode}: two browsers adding at the same time both see the union, live`, async () => {
    const [ctxA, ctxB] = [await newContext(), await newContext()]
    const id = newListId()
    const [a, b] = await Promise.all([openList(ctxA, mode, id), openList(ctxB, mode, id)])

    const fromA = ["Buy oat milk", "Book the train to Lyon", "Water the plants"]
    const fromB = ["Call the plumber", "Renew passport", "Return library books"]
    await Promise.all([addTodos(a, fromA), addTodos(b, fromB)])
    const union = [...fromA, ...fromB]
    await Promise.all([waitForList(a, union), waitForList(b, union)])

    // Toggle, edit and delete travel too.
    await todoRow(a, "Buy oat milk").locator(".toggle").check()
    await todoRow(b, "Renew passport").locator(".toggle").check()
    await todoRow(b, "Return library books").locator(".delete").click()
    await todoRow(a, "Water the plants").locator(".title").dblclick()
    await a.fill("#editing", "Water the plants on the balcony")
    await a.press("#editing", "Enter")
    const after = ["Buy oat milk ✓", "Book the train to Lyon", "Water the plants on the balcony",
      "Call the plumber", "Renew passport ✓"]
    await Promise.all([waitForList(a, after), waitForList(b, after)])
    await Promise.all([waitForStatus(a, "online"), waitForStatus(b, "online")])

    if (mode === "ws") await screenshotSideBySide(a, b, "two-contexts.png", "WebSocket")
    await Promise.all([ctxA.close(), ctxB.close()])
  })
}

test("http: two browsers adding at the same time both see the union after reload", async () => {
  const [ctxA, ctxB] = [await newContext(), await newContext()]
  const id = newListId()
  const [a, b] = await Promise.all([openList(ctxA, "http", id), openList(ctxB, "http", id)])

  const fromA = ["Draft the agenda", "Send invites"]
  const fromB = ["Book a room", "Order coffee"]
  await Promise.all([addTodos(a, fromA), addTodos(b, fromB)])
  await Promise.all([waitForList(a, fromA), waitForList(b, fromB)])
  // "Online" means every POST has been answered, i.e. the relay has it all.
  await Promise.all([waitForStatus(a, "online"), waitForStatus(b, "online")])

  await Promise.all([a.reload(), b.reload()])
  const union = [...fromA, ...fromB]
  await Promise.all([waitForList(a, union), waitForList(b, union)])
  await Promise.all([ctxA.close(), ctxB.close()])
})

for (const mode of ["ws", "repo", "http"]) {
  test(`${mode}: edits made offline are kept and converge when back online`, async () => {
    const [ctxA, ctxB] = [await newContext(), await newContext()]
    const id = newListId()
    const [a, b] = await Promise.all([openList(ctxA, mode, id), openList(ctxB, mode, id)])
    await addTodos(a, ["Pack the tent"])
    await waitForStatus(a, "online")
    if (mode === "http") await b.reload()
    await waitForList(b, ["Pack the tent"])

    await ctxA.setOffline(true)
    await waitForStatus(a, "offline")
    await addTodos(a, ["Buy batteries", "Check the weather"])
    await todoRow(a, "Pack the tent").locator(".toggle").check()
    await todoRow(a, "Buy batteries").locator(".toggle").check()
    await addTodos(b, ["Charge the power bank"]) // meanwhile, online
    await waitForList(a, ["Pack the tent ✓", "Buy batteries ✓", "Check the weather"])
    await waitForStatus(b, "online")
    assert.ok(!(await shown(b)).includes("Check the weather"), "an edit made offline reached the other browser")

    await ctxA.setOffline(false)
    const everything = ["Pack the tent ✓", "Buy batteries ✓", "Check the weather", "Charge the power bank"]
    if (mode === "http") {
      // The tutorial's flow: A saves when it is back; both see it all on load.
      await waitForStatus(a, "online")
      await Promise.all([a.reload(), b.reload()])
    }
    await Promise.all([waitForList(a, everything), waitForList(b, everything)])
    await Promise.all([waitForStatus(a, "online"), waitForStatus(b, "online")])
    lists[mode] = { id, todos: everything }
    await Promise.all([ctxA.close(), ctxB.close()])
  })
}

for (const mode of ["http", "ws", "repo"]) {
  test(`${mode}: the token setting — refused without one, typed in the settings, kept, carried in the share link`, async () => {
    const ctx = await newContext()
    await ctx.grantPermissions(["clipboard-read", "clipboard-write"], { origin: preview.url })
    const id = newListId()
    // No token: the relay refuses, and the page says so (not just "offline").
    const page = await openList(ctx, mode, id, { token: null, status: "denied" })
    assert.equal(await page.textContent("#status-label"), "No access")
    await addTodos(page, ["Made before the token"])

    // A wrong one: the same.
    await page.fill("#token", "not-a-valid-token")
    await page.press("#token", "Enter")
    await waitForStatus(page, "denied")
    assert.deepEqual(await relayTitles(id), [], "something reached the relay without a valid token")

    // The right one, typed in the settings: it syncs, and what was made before gets there.
    await page.fill("#token", WRITER)
    await page.click("#relay-form button[type=submit]")
    await waitForStatus(page, "online")
    await addTodos(page, ["Made with the token"])
    await waitForStatus(page, "online")
    const both = ["Made before the token", "Made with the token"]
    await waitFor(async () => JSON.stringify(await relayTitles(id)) === JSON.stringify([...both].sort()), "the relay to hold both todos")

    // Kept in the browser across a reload; the address bar never shows it.
    await page.reload()
    await waitForStatus(page, "online")
    assert.equal(await page.inputValue("#token"), WRITER)
    assert.equal(await page.getAttribute("#token", "type"), "password", "the token is masked")
    assert.ok(!page.url().includes(WRITER), `the token is in the address bar: ${page.url()}`)

    // The share link carries it: a fresh browser opening it syncs the list.
    await page.click("#copy-link")
    const link = await page.evaluate(() => navigator.clipboard.readText())
    assert.ok(link.includes(`token=${WRITER}`), `share link without the token: ${link}`)
    const other = await newContext()
    const shared = await other.newPage()
    await shared.goto(link)
    await waitForStatus(shared, "online")
    await waitForList(shared, both)
    if (mode === "ws") await screenshotSettings(page, "token-setting.png")
    await Promise.all([ctx.close(), other.close()])
  })
}

for (const mode of ["http", "ws", "repo"]) {
  test(`${mode}: a read-only token shows the list; its edits stay in the browser`, async () => {
    const [ctxW, ctxR] = [await newContext(), await newContext()]
    const id = newListId()
    const writer = await openList(ctxW, mode, id)
    await addTodos(writer, ["Written by the writer"])
    await waitForStatus(writer, "online")
    await waitFor(async () => (await relayTitles(id)).length === 1, "the relay to hold the writer's todo")

    const reader = await openList(ctxR, mode, id, { token: READER, status: mode === "repo" ? "online" : "readonly" })
    await waitForList(reader, ["Written by the writer"])
    await addTodos(reader, ["Typed by the reader"])
    if (mode !== "repo") await waitForStatus(reader, "readonly")
    await waitForList(reader, ["Written by the writer", "Typed by the reader"]) // kept locally

    // The writer's next edit still reaches a live reader; the reader's never leaves it.
    await addTodos(writer, ["Written later"])
    await waitForStatus(writer, "online")
    if (mode === "http") await reader.reload()
    await waitForList(reader, ["Written by the writer", "Typed by the reader", "Written later"])
    const settle = Date.now() + 1000
    while (Date.now() < settle) {
      assert.deepEqual(await relayTitles(id), ["Written by the writer", "Written later"])
      await new Promise((r) => setTimeout(r, 100))
    }
    if (mode === "http") await writer.reload()
    await waitForList(writer, ["Written by the writer", "Written later"])
    await Promise.all([ctxW.close(), ctxR.close()])
  })
}

test("after a relay restart a fresh browser loads the full list, in every mode", async () => {
  assert.ok(Object.keys(lists).length > 0, "the offline tests left no lists to reload")
  await stopProcess(relay)
  relay = await startRelay() // same data dir, new port
  for (const list of Object.values(lists)) {
    for (const mode of ["http", "ws", "repo"]) {
      const ctx = await newContext() // fresh: nothing in its local storage
      const page = await openList(ctx, mode, list.id)
      await waitForList(page, list.todos)
      await ctx.close()
    }
  }
})

test("no uncaught errors in the pages", () => {
  assert.deepEqual(pageErrors, [])
})

// ---- screenshots ---------------------------------------------------------------

async function screenshotSettings(page, name) {
  await page.mouse.move(0, 0)
  await page.locator("#token").blur()
  mkdirSync(ARTIFACTS, { recursive: true })
  await page.screenshot({ path: join(ARTIFACTS, name), fullPage: true, animations: "disabled" })
}

async function screenshotSideBySide(a, b, name, label) {
  await Promise.all([a.mouse.move(0, 0), b.mouse.move(0, 0)]) // no hover effects
  const shot = (page) => page.screenshot({ animations: "disabled" })
  const [left, right] = await Promise.all([shot(a), shot(b)])
  const ctx = await browser.newContext({ viewport: { width: 1300, height: 840 } })
  const page = await ctx.newPage()
  const img = (png, caption) => `<figure><figcaption>${caption}</figcaption><img src="data:image/png;base64,${png.toString("base64")}"></figure>`
  await page.setContent(`<!doctype html><style>
      body { margin: 0; padding: 20px; display: flex; gap: 20px; background: #d9dce5; font: 14px system-ui, sans-serif; }
      figure { margin: 0; } figcaption { margin-bottom: 8px; color: #444; font-weight: 600; }
      img { display: block; border-radius: 10px; box-shadow: 0 4px 18px #0003; }
    </style>${img(left, `Browser A · ${label}`)}${img(right, `Browser B · ${label}`)}`)
  mkdirSync(ARTIFACTS, { recursive: true })
  writeFileSync(join(ARTIFACTS, name), await page.screenshot({ fullPage: true }))
  await ctx.close()
}
