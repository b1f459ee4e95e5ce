// The todo app: one Automerge document per list, kept locally, synced with
// the relay in one of three ways (src/sync/*.js).
import { Automerge } from "./automerge.js"
import { generateAutomergeUrl, parseAutomergeUrl, isValidDocumentId } from "@automerge/automerge-repo/slim"
import { emptyList, todos, addTodo, toggleTodo, renameTodo, deleteTodo, clearCompleted } from "./list.js"
import { loadLocal, saveLocal, getSetting, setSetting } from "./local.js"
import { httpSync } from "./sync/http.js"
import { wsSync } from "./sync/ws.js"
import { repoSync } from "./sync/repo.js"
import "./style.css"

const MODES = {
  http: { start: httpSync, help: "Saves with POST after every change and merges the relay's copy on load — the Automerge tutorial's flow. Reload to see others' edits." },
  ws: { start: wsSync, help: "The relay's per-document WebSocket: changes are pushed both ways as they happen." },
  repo: { start: repoSync, help: "An unmodified automerge-repo client with WebSocketClientAdapter, syncing live through the relay." },
}

// Settings come from the URL (?mode=ws&relay=...#doc=...&token=...) or what
// was used last. The token rides in the link's #fragment, which browsers never
// send to the server that serves the page; it is kept in localStorage and the
// address bar drops it once read.
const params = new URLSearchParams(location.search)
const hashParams = () => new URLSearchParams(location.hash.slice(1))
let mode = MODES[params.get("mode")] ? params.get("mode") : getSetting("mode", "ws")
let relay = cleanRelayUrl(params.get("relay") ?? getSetting("relay", "http://localhost:5000"))
let token = (hashParams().get("token") ?? params.get("token") ?? getSetting("token", "")).trim()

// The list's id is an automerge-repo document id, so the same list works in all modes.
let docId
let doc
let sync
let editingId = null // the todo whose title is being edited, and the text so far
let draft = ""
let rendering = false // a re-render removes the edit box: ignore its blur then

const $ = (selector) => document.querySelector(selector)

function openList() {
  sync?.stop()
  docId = listIdFromHash() ?? newListId()
  doc = loadLocal(docId) ?? emptyList()
  saveLocal(docId, doc)
  setSetting("mode", mode)
  setSetting("relay", relay)
  setSetting("token", token)
  history.replaceState(null, "", pageLink())
  sync = MODES[mode].start({ docId, relay, token, getDoc: () => doc, receive, setStatus })
  renderSettings()
  render()
}

// A local edit: apply it, keep it, show it, tell the sync.
function edit(fn, ...args) {
  const headsBefore = Automerge.getHeads(doc)
  doc = fn(doc, ...args)
  saveLocal(docId, doc)
  render()
  sync.changed(headsBefore)
}

// Changes from the relay: a document (merge) or bytes (loadIncremental).
function receive(remote) {
  const before = Automerge.getHeads(doc).join()
  doc = remote instanceof Uint8Array ? Automerge.loadIncremental(doc, remote) : Automerge.merge(doc, remote)
  if (Automerge.getHeads(doc).join() === before) return
  saveLocal(docId, doc)
  render()
}

function setStatus(status, detail = "") {
  const el = $("#status")
  el.dataset.status = status
  el.title = detail
  $("#status-label").textContent = {
    online: "Online", syncing: "Syncing…", offline: "Offline", denied: "No access", readonly: "Read-only",
  }[status]
}

// ---- ids and links ---------------------------------------------------------

function listIdFromHash() {
  const id = new URLSearchParams(location.hash.slice(1)).get("doc")?.replace(/^automerge:/, "")
  return id && isValidDocumentId(id) ? id : null
}

function newListId() {
  return parseAutomergeUrl(generateAutomergeUrl()).documentId
}

// The address of this list and these settings, without the token.
function pageLink() {
  const url = new URL(location.href)
  url.search = new URLSearchParams({ mode, relay }).toString()
  url.hash = `doc=${docId}`
  return url.toString()
}

// What "Copy share link" copies: the page link plus the token, so whoever opens
// it syncs with the same access.
function shareLink() {
  const url = new URL(pageLink())
  if (token) url.hash = new URLSearchParams({ doc: docId, token }).toString()
  return url.toString()
}

function cleanRelayUrl(text) {
  return text.trim().replace(/\/+$/, "")
}

// ---- rendering -------------------------------------------------------------

function element(tag, props = {}, ...children) {
  const el = Object.assign(document.createElement(tag), props)
  el.append(...children)
  return el
}

function render() {
  rendering = true
  const items = todos(doc)
  $("#todos").replaceChildren(...items.map(renderTodo))
  const left = items.filter((t) => !t.done).length
  $("#count").textContent = items.length === 0 ? "" : `${left} ${left === 1 ? "item" : "items"} left`
  $("#clear").hidden = !items.some((t) => t.done)
  $("#empty").hidden = items.length > 0
  $("#list-footer").hidden = items.length === 0
  $("#list-id").textContent = docId
  $("#editing")?.focus()
  rendering = false
}

// The settings, when they change (not on every render: that would undo typing).
function renderSettings() {
  $("#relay").value = relay
  $("#token").value = token
  for (const input of document.querySelectorAll("input[name=mode]")) input.checked = input.value === mode
  $("#mode-help").textContent = MODES[mode].help
}

function startEditing(todo) {
  editingId = todo.id
  draft = todo.title
  render()
}

function renderTodo(todo) {
  const li = element("li", { className: `todo${todo.done ? " done" : ""}` })
  li.dataset.id = todo.id
  const checkbox = element("input", { type: "checkbox", checked: todo.done, className: "toggle" })
  checkbox.setAttribute("aria-label", `Done: ${todo.title}`)
  checkbox.addEventListener("change", () => edit(toggleTodo, todo.id))

  if (editingId === todo.id) {
    // A remote change re-renders the list; the draft survives that.
    const input = element("input", { id: "editing", className: "edit", value: draft })
    input.setAttribute("aria-label", "Edit title")
    input.addEventListener("input", () => { draft = input.value })
    const finish = (save) => {
      if (editingId !== todo.id) return
      editingId = null
      const title = draft.trim()
      if (save && title && title !== todo.title) edit(renameTodo, todo.id, title)
      else if (save && !title) edit(deleteTodo, todo.id)
      else render()
    }
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") finish(true)
      if (e.key === "Escape") finish(false)
    })
    input.addEventListener("blur", () => { if (!rendering) finish(true) })
    li.append(checkbox, input)
    return li
  }

  const title = element("span", { className: "title", textContent: todo.title, title: "Double-click to edit" })
  title.addEventListener("dblclick", () => startEditing(todo))
  const editButton = element("button", { className: "icon edit-button", textContent: "✎", title: "Edit" })
  editButton.setAttribute("aria-label", `Edit ${todo.title}`)
  editButton.addEventListener("click", () => startEditing(todo))
  const remove = element("button", { className: "icon delete", textContent: "×", title: "Delete" })
  remove.setAttribute("aria-label", `Delete ${todo.title}`)
  remove.addEventListener("click", () => edit(deleteTodo, todo.id))
  li.append(checkbox, title, editButton, remove)
  return li
}

// ---- controls --------------------------------------------------------------

$("#new-todo").addEventListener("submit", (e) => {
  e.preventDefault()
  const input = $("#new-title")
  const title = input.value.trim()
  if (title) edit(addTodo, title)
  input.value = ""
})
$("#clear").addEventListener("click", () => edit(clearCompleted))
for (const input of document.querySelectorAll("input[name=mode]")) {
  input.addEventListener("change", () => { mode = input.value; openList() })
}
$("#relay-form").addEventListener("submit", (e) => {
  e.preventDefault()
  relay = cleanRelayUrl($("#relay").value)
  token = $("#token").value.trim()
  openList()
})
$("#show-token").addEventListener("click", () => {
  const input = $("#token")
  const show = input.type === "password"
  input.type = show ? "text" : "password"
  $("#show-token").textContent = show ? "Hide" : "Show"
  $("#show-token").setAttribute("aria-pressed", String(show))
})
$("#new-list").addEventListener("click", () => {
  location.hash = `doc=${newListId()}` // hashchange opens it
})
$("#copy-link").addEventListener("click", async () => {
  await navigator.clipboard?.writeText(shareLink()).catch(() => {})
  $("#copy-link").textContent = "Link copied"
  setTimeout(() => ($("#copy-link").textContent = "Copy share link"), 1500)
})
window.addEventListener("hashchange", () => {
  const linked = hashParams().get("token")
  if (linked !== null) token = linked.trim()
  if (linked !== null || listIdFromHash() !== docId) openList()
})

openList()
