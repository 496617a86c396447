// The unmodified E2B JavaScript SDKs through the gateway: E2B_API_URL, E2B_SANDBOX_URL and
// E2B_API_KEY come from tests/e2e/test_e2e_js_sdk.py. Prints one JSON object with what it saw; the
// Python test asserts on it (a thrown error exits non-zero with its message on stderr).
import { Sandbox, CommandExitError, TimeoutError } from 'e2b'
import { Sandbox as CodeInterpreter } from '@e2b/code-interpreter'

const seen = {}

const sbx = await Sandbox.create('base', { timeoutMs: 120_000, metadata: { suite: 'js' } })
try {
  seen.sandboxId = sbx.sandboxId
  const run = await sbx.commands.run('echo hello from $(whoami)')
  seen.stdout = run.stdout
  seen.exitCode = run.exitCode
  try {
    await sbx.commands.run('exit 3')
  } catch (error) {
    seen.failedCommand = error instanceof CommandExitError ? error.exitCode : `unexpected: ${error}`
  }
  try {
    await sbx.commands.run('sleep 30', { timeoutMs: 1_000 })
    seen.timedOut = 'no error'
  } catch (error) {
    seen.timedOut = error instanceof TimeoutError ? 'TimeoutError' : `${error?.constructor?.name}: ${error}`
  }
  await sbx.files.write('notes/js.txt', 'written by the JS SDK\n')
  seen.read = await sbx.files.read('notes/js.txt')
  seen.listed = (await sbx.files.list('notes')).map((entry) => entry.name)
  const info = await sbx.getInfo()
  seen.state = info.state
  seen.metadata = info.metadata
  const paginator = Sandbox.list()
  const items = await paginator.nextItems()
  seen.listedIds = items.map((item) => item.sandboxId)
} finally {
  seen.killed = await sbx.kill()
}

const ci = await CodeInterpreter.create('code-interpreter', { timeoutMs: 120_000 })
try {
  const first = await ci.runCode('x = 6 * 7\nx')
  seen.codeText = first.text
  const kept = await ci.runCode('print(x + 1)')
  seen.codeStdout = kept.logs.stdout.join('')
  const failed = await ci.runCode('undefined_name')
  seen.codeError = failed.error ? failed.error.name : null
  seen.contexts = (await ci.listCodeContexts()).map((context) => context.language)
} finally {
  await ci.kill()
}

// Auto-pause and auto-resume: the timeout pauses it, the next call wakes it on the same workspace.
const napping = await Sandbox.create('base', { timeoutMs: 5_000, lifecycle: { onTimeout: 'pause', autoResume: true } })
try {
  await napping.files.write('kept.txt', 'kept across the pause\n')
  seen.lifecycle = (await napping.getInfo()).lifecycle
  const deadline = Date.now() + 90_000
  while ((await napping.getInfo()).state !== 'paused') {
    if (Date.now() > deadline) throw new Error('the timeout did not pause the sandbox within 90 s')
    await new Promise((resolve) => setTimeout(resolve, 500)) // polling a condition, with a deadline
  }
  seen.woken = await napping.files.read('kept.txt')
  seen.wokenState = (await napping.getInfo()).state
} finally {
  await napping.kill()
}

console.log(JSON.stringify(seen))
