#!/usr/bin/env node
// An independent MCP client for the interop tests: the official TypeScript SDK's `Client`,
// driven line by line from stdin so that a Python test can look at the disk between steps.
//
//   node ts_client.mjs stdio <command> [args...]   spawn the server (StdioClientTransport)
//   node ts_client.mjs http <url>                  connect to it (StreamableHTTPClientTransport)
//
// The first stdout line reports the handshake {id: 0, ok, protocolVersion, serverVersion, ...}.
// Then each stdin line is one JSON command {id, op, ...}; each stdout line is the JSON answer
// {id, ok, ...} (ok=false with `error` when the SDK threw). Commands:
//   {op:"listTools"}                          -> {tools}
//   {op:"call", name, arguments}              -> {result, ms}   (awaited)
//   {op:"start", handle, name, arguments, abortAfterMs?, abortAtProgress?}
//        -> {} once the request is sent; the call runs with an AbortController's signal and
//        an onprogress handler, and is aborted abortAfterMs after start, or (abortAtProgress:
//        n) right when its n-th progress notification arrives: the server is surely at work
//   {op:"wait", handle}                       -> the handle's status once the call settled
//   {op:"waitAnswer", handle, timeoutMs}      -> its status once the server answered the
//        request on the wire (or after timeoutMs): the SDK drops an answer that comes after
//        the abort, but the transport sees it
//   {op:"sdkErrors"}                          -> {sdkErrors} collected since the last look
//   {op:"close"}                              -> {sdkErrors}; closes the client, then exits
// A handle's status: {state: "running"|"completed"|"failed"|"aborted", requestId, progress,
//   startedMs, abortedMs, settledMs, result?, error?, answer?}; "completed" means the call
//   returned a result before the abort; `answer` is the server's JSON-RPC answer to the
//   request (with a result's structured content left out), if one came.
// Arguments may hold {"$repeat": [text, count]}, replaced by text repeated count times, so that
// tens of megabytes of content need not travel through the test's pipe.
// Every error the SDK reports outside a request (client.onerror) is collected, and so is every
// notification that no handler took.

import { createInterface } from 'node:readline';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';

const CALL_TIMEOUT_MS = 120_000; // a hung call fails the test instead of hanging the run

const [kind, ...rest] = process.argv.slice(2);
let transport;
if (kind === 'stdio') {
  const [command, ...args] = rest;
  // stderr: 'inherit' sends the server's log to ours, which the test keeps.
  transport = new StdioClientTransport({ command, args, stderr: 'inherit' });
} else if (kind === 'http') {
  transport = new StreamableHTTPClientTransport(new URL(rest[0]));
} else {
  process.stderr.write('usage: ts_client.mjs stdio <command> [args...] | http <url>\n');
  process.exit(2);
}

const t0 = performance.now();
const now = () => Math.round(performance.now() - t0);

// What goes over the wire, seen at the transport, beneath the SDK's bookkeeping: the id of each
// tools/call request as it is sent, and every answer the server sends.
let protocolVersion = null; // the SDK tells the transport; stdio has no such hook
const setProtocolVersion = transport.setProtocolVersion?.bind(transport);
transport.setProtocolVersion = (version) => {
  protocolVersion = version;
  setProtocolVersion?.(version);
};
let awaitingId = null; // the handle whose request is about to be sent
const send = transport.send.bind(transport);
transport.send = (message, options) => {
  if (message.method === 'tools/call' && awaitingId !== null) {
    awaitingId.requestId = message.id;
    awaitingId = null;
  }
  return send(message, options);
};
const answers = new Map(); // request id -> the server's answer
const answerWaiters = new Map(); // request id -> callbacks

function watchAnswers() {
  const onmessage = transport.onmessage; // the SDK's, set by connect()
  transport.onmessage = (message, extra) => {
    if (message.id !== undefined && ('result' in message || 'error' in message)) {
      answers.set(message.id, message);
      for (const wake of answerWaiters.get(message.id) ?? []) wake();
    }
    onmessage?.(message, extra);
  };
}

const client = new Client({ name: 'atomictools-interop-ts', version: '1.0.0' });
const sdkErrors = [];
client.onerror = (error) => sdkErrors.push(String(error?.stack ?? error));
client.fallbackNotificationHandler = async (notification) => {
  sdkErrors.push(`unhandled notification ${notification.method}`);
};

function expand(value) {
  if (Array.isArray(value)) return value.map(expand);
  if (value && typeof value === 'object') {
    const keys = Object.keys(value);
    if (keys.length === 1 && keys[0] === '$repeat') {
      const [text, count] = value.$repeat;
      return text.repeat(count);
    }
    return Object.fromEntries(keys.map((key) => [key, expand(value[key])]));
  }
  return value;
}

function describe(error) {
  return { name: error?.name, code: error?.code, message: String(error?.message ?? error) };
}

const handles = new Map();

function status(handle) {
  const { controller, promise, ...visible } = handle;
  const answer = answers.get(handle.requestId);
  if (answer !== undefined) {
    visible.answer = answer.error
      ? { error: answer.error }
      : { result: { isError: answer.result?.isError ?? false, content: answer.result?.content } };
  }
  return visible;
}

function abort(handle) {
  if (handle.state === 'running') {
    handle.abortedMs = now();
    handle.controller.abort(new Error('aborted by the interop test'));
  }
}

function start({ name, arguments: args, abortAfterMs, abortAtProgress }) {
  const handle = {
    state: 'running',
    requestId: null,
    progress: [],
    startedMs: now(),
    abortedMs: null,
    settledMs: null,
    controller: new AbortController(),
  };
  awaitingId = handle;
  const timer = abortAfterMs === undefined ? null : setTimeout(() => abort(handle), abortAfterMs);
  handle.promise = client
    .callTool({ name, arguments: expand(args) }, undefined, {
      signal: handle.controller.signal,
      timeout: CALL_TIMEOUT_MS,
      onprogress: (progress) => {
        handle.progress.push({ ...progress, ms: now() });
        if (handle.progress.length === abortAtProgress) abort(handle);
      },
    })
    .then(
      (result) => {
        handle.state = 'completed';
        handle.result = result;
      },
      (error) => {
        handle.state = handle.controller.signal.aborted ? 'aborted' : 'failed';
        handle.error = describe(error);
      },
    )
    .finally(() => {
      handle.settledMs = now();
      clearTimeout(timer);
    });
  return handle;
}

async function until(condition, timeoutMs) {
  const deadline = performance.now() + timeoutMs;
  while (!condition() && performance.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

async function run(command) {
  switch (command.op) {
    case 'listTools': {
      // listTools also caches each tool's output schema: callTool validates against it.
      const { tools } = await client.listTools();
      return { tools };
    }
    case 'call': {
      const started = performance.now();
      const result = await client.callTool(
        { name: command.name, arguments: expand(command.arguments ?? {}) },
        undefined,
        { timeout: CALL_TIMEOUT_MS },
      );
      return { result, ms: Math.round(performance.now() - started) };
    }
    case 'start': {
      const handle = start(command);
      handles.set(command.handle, handle);
      await until(() => handle.requestId !== null || handle.state !== 'running', 30_000);
      if (handle.requestId === null) throw new Error(`no request was sent: ${JSON.stringify(handle.error)}`);
      return {};
    }
    case 'wait': {
      const handle = handles.get(command.handle);
      await handle.promise;
      return status(handle);
    }
    case 'waitAnswer': {
      const handle = handles.get(command.handle);
      if (!answers.has(handle.requestId)) {
        await new Promise((resolve) => {
          const timer = setTimeout(resolve, command.timeoutMs ?? 30_000);
          const waiters = answerWaiters.get(handle.requestId) ?? [];
          waiters.push(() => {
            clearTimeout(timer);
            resolve();
          });
          answerWaiters.set(handle.requestId, waiters);
        });
      }
      return status(handle);
    }
    case 'sdkErrors':
      return { sdkErrors: sdkErrors.splice(0) };
    case 'close': {
      if (transport instanceof StreamableHTTPClientTransport) {
        await transport.terminateSession();
      }
      await client.close();
      return { sdkErrors: sdkErrors.splice(0) };
    }
    default:
      throw new Error(`unknown op ${command.op}`);
  }
}

function reply(message) {
  process.stdout.write(`${JSON.stringify(message)}\n`);
}

await client.connect(transport);
watchAnswers();
reply({
  id: 0,
  ok: true,
  protocolVersion,
  serverVersion: client.getServerVersion(),
  serverCapabilities: client.getServerCapabilities(),
});

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
// Commands run one after another; a started call runs on while later commands are served.
for await (const line of lines) {
  if (!line.trim()) continue;
  const command = JSON.parse(line);
  try {
    reply({ id: command.id, ok: true, ...(await run(command)) });
  } catch (error) {
    reply({ id: command.id, ok: false, error: describe(error) });
  }
  if (command.op === 'close') break;
}
process.exit(0);
