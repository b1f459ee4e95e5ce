// The todo list document: { todos: [{ id, title, done }] }.
// Every edit is a small Automerge change, so concurrent edits merge.
import { Automerge } from "./automerge.js"

// Every copy of a list starts from the *same* first change: fixed actor id,
// time 0. Two people who open a new list id before they ever sync create
// byte-identical first changes, so their copies merge instead of having two
// competing `todos` arrays.
const GENESIS_ACTOR = "00000000000000000000000000000000"

export function emptyList() {
  const genesis = Automerge.change(
    Automerge.init({ actor: GENESIS_ACTOR }),
    { time: 0, message: "New todo list" },
    (d) => { d.todos = [] },
  )
  // Reload so that our own edits get a fresh, random actor id.
  return Automerge.load(Automerge.save(genesis))
}

export const todos = (doc) => doc.todos ?? []

export function addTodo(doc, title) {
  return Automerge.change(doc, (d) => {
    d.todos ??= []
    d.todos.push({ id: crypto.randomUUID(), title, done: false })
  })
}

// Apply `fn` to the todo with this id (a no-op if someone deleted it meanwhile).
function changeTodo(doc, id, fn) {
  return Automerge.change(doc, (d) => {
    const i = (d.todos ?? []).findIndex((t) => t.id === id)
    if (i >= 0) fn(d, i)
  })
}

export const toggleTodo = (doc, id) =>
  changeTodo(doc, id, (d, i) => { d.todos[i].done = !d.todos[i].done })

// updateText turns the edit into character insertions and deletions, so two
// people fixing different words of the same title both keep their fix.
export const renameTodo = (doc, id, title) =>
  changeTodo(doc, id, (d, i) => { Automerge.updateText(d, ["todos", i, "title"], title) })

export const deleteTodo = (doc, id) =>
  changeTodo(doc, id, (d, i) => { d.todos.deleteAt(i) })

export function clearCompleted(doc) {
  return Automerge.change(doc, (d) => {
    for (let i = (d.todos ?? []).length - 1; i >= 0; i--) if (d.todos[i].done) d.todos.deleteAt(i)
  })
}
