// Browser test of the todo app against a real relay, in Debian's chromium.
//
//   npm test                      (from client-example/)
//   RELAY_BIN=/path/to/automerge-relay npm test
//   CHROMIUM=/path/to/chromium npm test
//   RELAY_TEST_VERBOSE=1 npm test   (echo the relay's and vite's output)
//
// It builds the app, serves it with `vite preview` and starts the relay, each
// on a free loopback port, and drives two isolated browser contexts. The page
// and the relay are on different origins, so CORS is exercised for real.
import { test, before, after } from "node:test"
import assert from "node:assert/strict"
import { spawn, spawnSync } from "node:child_process"
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { dirname, join, resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { chromium } from "playwright-core"
import { generateAutomergeUrl, parseAutomergeUrl } from "@automerge/automerge-repo"

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

let dataDir
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
  startProcess(RELAY_BIN, ["serve", "--listen", "127.0.0.1:0", "--data-dir", dataDir], /listening on (http:\/\/[\d.:]+)/)

// ---- the app, through the browser --------------------------------------------

const newListId = () => parseAutomergeUrl(generateAutomergeUrl()).documentId

async function newContext() {
  const context = await browser.newContext({ viewport: { width: 620, height: 760 } })
  context.on("page", (page) => page.on("pageerror", (err) => pageErrors.push(`${page.url()}: ${err.message}`)))
  return context
}

async function openList(context, mode, listId) {
  const page = await context.newPage()
  const url = `${preview.url}/?mode=${mode}&relay=${encodeURIComponent(relay.url)}#doc=${listId}`
  await page.goto(url)
  await waitForStatus(page, "online")
  return page
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

// ---- screenshot ----------------------------------------------------------------

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
