// ARL's JavaScript prelude: what a Node REPL user expects around the engine (console,
// util.inspect, timers, process, require('fs')), run once in every realm (a session's own
// namespace and each context), at snapshot time for the first. It is a function of the
// guest's native half (`lib.rs`) and returns the hooks the guest calls between turns.
(function (native) {
  'use strict';
  const G = globalThis;
  Object.defineProperty(G, '__arl_forget', { enumerable: false });
  const define = (obj, name, value) =>
    Object.defineProperty(obj, name, { value, writable: true, configurable: true, enumerable: false });

  // ---- util.inspect, after Node's defaults (depth 2, breakLength 80, compact 3)
  const ESC = { '\\': '\\\\', '\n': '\\n', '\t': '\\t', '\r': '\\r', '\b': '\\b', '\f': '\\f', '\v': '\\v' };
  function quote(s) {
    let q = "'";
    if (s.includes("'")) {
      if (!s.includes('"')) q = '"';
      else if (!s.includes('`') && !s.includes('${')) q = '`';
    }
    let out = s.replace(/[\\\x00-\x1f\x7f]/g, (c) => ESC[c] || '\\x' + c.charCodeAt(0).toString(16).padStart(2, '0'));
    if (q === "'") out = out.replace(/'/g, "\\'");
    return q + out + q;
  }
  const IDENT = /^[A-Za-z_$][A-Za-z0-9_$]*$/;
  const key = (k) => (typeof k === 'symbol' ? `[${k.toString()}]` : IDENT.test(k) ? k : quote(k));
  const fnSource = Function.prototype.toString;
  function isClass(f) {
    let src = '';
    try { src = fnSource.call(f); } catch (_) { /* a revoked proxy */ }
    if (src.startsWith('class')) return true;
    // The engine prints classes as native code: a class is what has a read-only `prototype`
    // and is not one of the engine's own constructors.
    const d = Object.getOwnPropertyDescriptor(f, 'prototype');
    return !!d && d.writable === false && G[f.name] !== f;
  }
  function fnBase(f) {
    if (isClass(f)) {
      const parent = Object.getPrototypeOf(f);
      const ext = parent && parent !== Function.prototype && parent.name ? ` extends ${parent.name}` : '';
      return `[class ${f.name || '(anonymous)'}${ext}]`;
    }
    const kind = Object.prototype.toString.call(f).slice(8, -1);
    const type = kind === 'AsyncFunction' ? 'AsyncFunction'
      : kind === 'GeneratorFunction' ? 'GeneratorFunction'
      : kind === 'AsyncGeneratorFunction' ? 'AsyncGeneratorFunction' : 'Function';
    return f.name ? `[${type}: ${f.name}]` : `[${type} (anonymous)]`;
  }
  function ctorName(o) {
    let p = o;
    while (p !== null) {
      const d = Object.getOwnPropertyDescriptor(p, 'constructor');
      if (d && typeof d.value === 'function' && d.value.name) return d.value.name;
      p = Object.getPrototypeOf(p);
    }
    return null;
  }
  function errorText(e) {
    const stack = typeof e.stack === 'string' && e.stack ? e.stack.trimEnd() : '';
    const head = `${e.name || 'Error'}${e.message ? ': ' + e.message : ''}`;
    if (!stack) return `[${head}]`;
    return stack.startsWith(head) ? stack : `${head}\n${stack}`;
  }
  function single(out, start) {
    let total = out.length + start;
    for (const o of out) { total += o.length; if (total > 80) return false; }
    return true;
  }
  function group(out, value, indent) {
    // Node's groupArrayElements: many short entries in aligned columns.
    const more = out.length > 0 && out[out.length - 1].startsWith('... ') ? 1 : 0;
    const n = out.length - more;
    const sep = 2, lens = out.slice(0, n).map((o) => o.length);
    let total = 0, max = 0;
    for (const l of lens) { total += l + sep; if (l > max) max = l; }
    const actualMax = max + sep;
    if (!(actualMax * 3 + indent < 80 && (total / actualMax > 5 || max <= 6))) return out;
    const averageBias = Math.sqrt(actualMax - total / out.length);
    const biasedMax = Math.max(actualMax - 3 - averageBias, 1);
    const columns = Math.min(Math.round(Math.sqrt(2.5 * biasedMax * n) / biasedMax),
      Math.floor((80 - indent) / actualMax), 3 * 4, 15);
    if (columns <= 1) return out;
    const widths = [];
    for (let i = 0; i < columns; i++) {
      let w = 0;
      for (let j = i; j < n; j += columns) if (lens[j] > w) w = lens[j];
      widths.push(w + sep);
    }
    let numeric = true;
    for (let i = 0; i < out.length; i++) {
      if (typeof value[i] !== 'number' && typeof value[i] !== 'bigint') { numeric = false; break; }
    }
    const rows = [];
    for (let i = 0; i < n; i += columns) {
      const end = Math.min(i + columns, n);
      let row = '';
      let j = i;
      for (; j < end - 1; j++) {
        const cell = `${out[j]}, `;
        row += numeric ? cell.padStart(widths[j - i]) : cell.padEnd(widths[j - i]);
      }
      row += numeric ? out[j].padStart(widths[j - i] - sep) : out[j];
      rows.push(row);
    }
    if (more) rows.push(out[n]);
    return rows;
  }
  function inspect(value, opts) {
    const depthLimit = opts && opts.depth !== undefined ? (opts.depth === null ? Infinity : opts.depth) : 2;
    const seen = [];
    const circular = new Map();
    let current = 0;
    function fmt(v, depth, indent) {
      switch (typeof v) {
        case 'string': return quote(v);
        case 'number': return Object.is(v, -0) ? '-0' : String(v);
        case 'bigint': return `${v}n`;
        case 'symbol': return v.toString();
        case 'undefined': return 'undefined';
        case 'boolean': return String(v);
      }
      if (v === null) return 'null';
      if (seen.includes(v)) {
        if (!circular.has(v)) circular.set(v, circular.size + 1);
        return `[Circular *${circular.get(v)}]`;
      }
      const isFn = typeof v === 'function';
      const tag = Object.prototype.toString.call(v).slice(8, -1);
      const name = ctorName(v);
      let base = '', braces = ['{', '}'], items = [], keys = Object.keys(v);
      const proto = name === null ? '[Object: null prototype] ' : '';
      if (Array.isArray(v)) {
        braces = [`${name && name !== 'Array' ? name + '(' + v.length + ') ' : ''}[`, ']'];
        keys = keys.filter((k) => !/^(0|[1-9]\d*)$/.test(k));
      } else if (isFn) {
        base = fnBase(v);
        keys = keys.filter((k) => k !== 'prototype');
        if (keys.length === 0) return base;
      } else if (v instanceof Error || tag === 'Error') {
        base = errorText(v);
        keys = keys.filter((k) => k !== 'stack' && k !== 'message');
        if (keys.length === 0) return base;
      } else if (v instanceof Date) {
        base = isNaN(v.getTime()) ? 'Invalid Date' : v.toISOString();
        if (keys.length === 0) return base;
      } else if (v instanceof RegExp) {
        base = String(v);
        if (keys.length === 0) return base;
      } else if (v instanceof Map) {
        braces = [`${proto}${name || 'Map'}(${v.size}) {`, '}'];
      } else if (v instanceof Set) {
        braces = [`${proto}${name || 'Set'}(${v.size}) {`, '}'];
      } else if (v instanceof Promise) {
        braces = ['Promise {', '}'];
      } else if (ArrayBuffer.isView(v) && !(v instanceof DataView)) {
        braces = [`${name || tag}(${v.length}) [`, ']'];
        keys = keys.filter((k) => !/^(0|[1-9]\d*)$/.test(k));
      } else if (v instanceof ArrayBuffer) {
        braces = [`${name || 'ArrayBuffer'} {`, '}'];
      } else if (v instanceof WeakMap || v instanceof WeakSet) {
        return `${name || tag} { <items unknown> }`;
      } else if (v instanceof Number || v instanceof String || v instanceof Boolean) {
        base = `[${name || tag}: ${fmt(v.valueOf(), depth + 1, indent)}]`;
        if (v instanceof String) keys = keys.filter((k) => !/^(0|[1-9]\d*)$/.test(k));
        if (keys.length === 0) return base;
      } else if (tag === 'Module') {
        braces = ['[Module: null prototype] {', '}'];
      } else if (name === 'Object' && tag !== 'Object') {
        braces = [`Object [${tag}] {`, '}'];
      } else if (name !== 'Object') {
        const prefix = name === null ? '[Object: null prototype]' : (name + (tag !== 'Object' && tag !== name ? ` [${tag}]` : ''));
        braces = [`${prefix} {`, '}'];
      }
      if (depth > depthLimit) {
        if (Array.isArray(v)) return '[Array]';
        return `[${name || tag}]`;
      }
      seen.push(v);
      current = depth;
      const next = indent + 2;
      if (Array.isArray(v) || (ArrayBuffer.isView(v) && !(v instanceof DataView))) {
        const shown = Math.min(v.length, 100);
        let holes = 0;
        for (let i = 0; i < shown; i++) {
          if (!Array.isArray(v) || Object.prototype.hasOwnProperty.call(v, i)) {
            if (holes) { items.push(`<${holes} empty item${holes > 1 ? 's' : ''}>`); holes = 0; }
            items.push(fmt(v[i], depth + 1, next));
          } else holes++;
        }
        if (holes) items.push(`<${holes} empty item${holes > 1 ? 's' : ''}>`);
        if (v.length > shown) items.push(`... ${v.length - shown} more item${v.length - shown > 1 ? 's' : ''}`);
      } else if (v instanceof Map) {
        for (const [k, val] of v) items.push(`${fmt(k, depth + 1, next)} => ${fmt(val, depth + 1, next)}`);
      } else if (v instanceof Set) {
        for (const k of v) items.push(fmt(k, depth + 1, next));
      } else if (v instanceof Promise) {
        const [state, result] = native.promiseState(v);
        items.push(state === 'pending' ? '<pending>'
          : state === 'rejected' ? `<rejected> ${fmt(result, depth + 1, next)}` : fmt(result, depth + 1, next));
      } else if (v instanceof ArrayBuffer) {
        const bytes = [...new Uint8Array(v).slice(0, 50)].map((b) => b.toString(16).padStart(2, '0'));
        items.push(`[Uint8Contents]: <${bytes.join(' ')}${v.byteLength > 50 ? ` ... ${v.byteLength - 50} more bytes` : ''}>`);
        items.push(`byteLength: ${v.byteLength}`);
      }
      const symbols = Object.getOwnPropertySymbols(v).filter((s) => Object.getOwnPropertyDescriptor(v, s).enumerable);
      for (const k of [...keys, ...symbols]) {
        const d = Object.getOwnPropertyDescriptor(v, k);
        const shown = d.get || d.set ? (d.get && d.set ? '[Getter/Setter]' : d.get ? '[Getter]' : '[Setter]')
          : fmt(d.value, depth + 1, next);
        items.push(`${key(k)}: ${shown}`);
      }
      seen.pop();
      let ref = '';
      if (circular.has(v)) ref = `<ref *${circular.get(v)}> `;
      if (base && items.length === 0) return ref + base;
      if (items.length === 0) {
        if (braces[0].endsWith('[')) return `${ref}${braces[0]}]`;
        return `${ref}${braces[0] === '{' ? '' : braces[0].slice(0, -1)}{}`;
      }
      let lines = items;
      if ((Array.isArray(v) || ArrayBuffer.isView(v)) && items.length > 6) lines = group(items, v, indent);
      const head = ref + (base ? base + ' ' : '');
      if (current - depth < 3 && lines.length === items.length) {
        const start = items.length + indent + braces[0].length + head.length + 10;
        if (single(items, start)) {
          const joined = items.join(', ');
          if (!joined.includes('\n')) return `${head}${braces[0]} ${joined} ${braces[1]}`;
        }
      }
      const pad = '\n' + ' '.repeat(indent);
      return `${head}${braces[0]}${pad}  ${lines.join(`,${pad}  `)}${pad}${braces[1]}`;
    }
    return fmt(value, 0, 0);
  }

  // ---- console, writing through the guest's stdout and stderr as Node's does
  function format(args) {
    if (args.length === 0) return '';
    let out = '', rest = args;
    if (typeof args[0] === 'string') {
      let i = 1;
      out = args[0].replace(/%[sdifjoOc%]/g, (m) => {
        if (m === '%%') return '%';
        if (i >= args.length) return m;
        const a = args[i++];
        switch (m) {
          case '%s': return typeof a === 'string' ? a : typeof a === 'bigint' ? `${a}n` : typeof a === 'object' && a !== null ? inspect(a, { depth: 1 }) : String(a);
          case '%d': case '%i': return typeof a === 'bigint' ? `${a}n` : String(m === '%i' ? parseInt(a) : Number(a));
          case '%f': return String(parseFloat(a));
          case '%j': try { return JSON.stringify(a); } catch (_) { return '[Circular]'; }
          case '%c': return '';
          default: return inspect(a);
        }
      });
      rest = args.slice(i);
      for (const a of rest) out += ' ' + (typeof a === 'string' ? a : inspect(a));
      return out;
    }
    return args.map((a) => (typeof a === 'string' ? a : inspect(a))).join(' ');
  }
  let groupIndent = '';
  const write = (fd) => (...args) => {
    let text = format(args);
    if (groupIndent) text = text.split('\n').map((l) => groupIndent + l).join('\n');
    native.write(fd, text + '\n');
  };
  const counts = new Map(), timers = new Map();
  const console = {
    log: write(1), info: write(1), debug: write(1),
    error: write(2), warn: write(2), trace: (...a) => write(2)('Trace: ' + format(a)),
    dir: (v, o) => native.write(1, inspect(v, o) + '\n'),
    table: (v) => native.write(1, inspect(v) + '\n'),
    assert: (ok, ...a) => { if (!ok) write(2)('Assertion failed' + (a.length ? ': ' + format(a) : '')); },
    count: (l = 'default') => { counts.set(l, (counts.get(l) || 0) + 1); write(1)(`${l}: ${counts.get(l)}`); },
    countReset: (l = 'default') => counts.delete(l),
    time: (l = 'default') => timers.set(l, native.now()),
    timeEnd: (l = 'default') => { if (timers.has(l)) { write(1)(`${l}: ${(native.now() - timers.get(l)).toFixed(3)}ms`); timers.delete(l); } },
    timeLog: (l = 'default', ...a) => { if (timers.has(l)) write(1)(`${l}: ${(native.now() - timers.get(l)).toFixed(3)}ms`, ...a); },
    group: (...a) => { if (a.length) write(1)(...a); groupIndent += '  '; },
    groupEnd: () => { groupIndent = groupIndent.slice(2); },
  };
  define(G, 'console', console);

  // ---- timers: a turn runs its event loop until no timer is left (as `node script.js`)
  let timerSeq = 0;
  const queue = new Map();
  class Timeout {
    constructor(id) { this._id = id; }
    ref() { return this; } unref() { return this; } hasRef() { return true; }
    [Symbol.toPrimitive]() { return this._id; }
  }
  function schedule(fn, ms, args, repeat) {
    if (typeof fn !== 'function') throw new TypeError('The "callback" argument must be of type function');
    const delay = Math.max(1, Number(ms) || 0);
    const id = ++timerSeq;
    queue.set(id, { fn, args, delay, repeat, due: native.now() + delay, seq: id });
    return new Timeout(id);
  }
  const clear = (t) => { if (t !== undefined && t !== null) queue.delete(typeof t === 'object' ? t._id : Number(t)); };
  define(G, 'setTimeout', (fn, ms, ...args) => schedule(fn, ms, args, false));
  define(G, 'setInterval', (fn, ms, ...args) => schedule(fn, ms, args, true));
  define(G, 'setImmediate', (fn, ...args) => schedule(fn, 0, args, false));
  define(G, 'clearTimeout', clear);
  define(G, 'clearInterval', clear);
  define(G, 'clearImmediate', clear);
  define(G, 'queueMicrotask', (fn) => { Promise.resolve().then(fn); });
  function nextTimer() {
    let best = null;
    for (const t of queue.values()) if (best === null || t.due < best.due || (t.due === best.due && t.seq < best.seq)) best = t;
    return best === null ? -1 : Math.max(0, best.due - native.now());
  }
  function fireTimer() {
    let best = null, bestId = 0;
    for (const [id, t] of queue) if (best === null || t.due < best.due || (t.due === best.due && t.seq < best.seq)) { best = t; bestId = id; }
    if (best === null) return;
    if (best.repeat) { best.due = native.now() + best.delay; best.seq = ++timerSeq; } else queue.delete(bestId);
    best.fn(...best.args);
  }
  const clearTimers = () => queue.clear();

  // ---- performance, process, require
  define(G, 'performance', { now: () => native.now(), timeOrigin: Date.now() - native.now() });
  const env = {};
  let cwd = '/workspace';
  const exit = (code = 0) => { native.exit(Number(code) | 0); };
  const process = {
    env, argv: ['node'], platform: 'wasi', arch: 'wasm32', pid: 1, version: 'v22.0.0-arl',
    versions: { boa: '0.22.0' }, exitCode: undefined,
    cwd: () => cwd,
    chdir: (dir) => { const to = resolve(dir); if (!native.fs('isdir', to)) throw fsError('ENOENT', 'no such file or directory', 'chdir', dir); cwd = to; },
    exit,
    hrtime: Object.assign((prev) => {
      const ns = BigInt(Math.round(native.now() * 1e6));
      const t = [Number(ns / 1000000000n), Number(ns % 1000000000n)];
      if (!prev) return t;
      let [s, n] = [t[0] - prev[0], t[1] - prev[1]];
      if (n < 0) { s -= 1; n += 1e9; }
      return [s, n];
    }, { bigint: () => BigInt(Math.round(native.now() * 1e6)) }),
    memoryUsage: () => ({ rss: native.memory(), heapTotal: native.memory(), heapUsed: native.memory(), external: 0, arrayBuffers: 0 }),
    nextTick: (fn, ...args) => { Promise.resolve().then(() => fn(...args)); },
    stdout: { write: (s) => { native.write(1, String(s)); return true; }, isTTY: false },
    stderr: { write: (s) => { native.write(2, String(s)); return true; }, isTTY: false },
  };
  define(process, '_arlStdin', '');
  define(G, 'process', process);

  function resolve(p) {
    p = String(p);
    const parts = (p.startsWith('/') ? p : cwd + '/' + p).split('/');
    const out = [];
    for (const part of parts) {
      if (part === '' || part === '.') continue;
      if (part === '..') out.pop(); else out.push(part);
    }
    return '/' + out.join('/');
  }
  function fsError(code, text, syscall, path) {
    const e = new Error(`${code}: ${text}, ${syscall} '${path}'`);
    e.code = code; e.syscall = syscall; e.path = path; e.errno = -1;
    return e;
  }
  const op = (name, syscall) => (path, ...rest) => {
    const [code, value] = native.fs(name, resolve(path), ...rest);
    if (code) throw fsError(code, value, syscall, path);
    return value;
  };
  const encoding = (o) => (typeof o === 'string' ? o : o && o.encoding) || null;
  const statOf = (s) => ({
    size: s[0], mtimeMs: s[1], mtime: new Date(s[1]),
    isFile: () => s[2] === 'file', isDirectory: () => s[2] === 'dir', isSymbolicLink: () => false,
  });
  const fs = {
    readFileSync: (p, o) => {
      if (p === 0 || p === '/dev/stdin') {
        const text = String(process._arlStdin || '');
        return encoding(o) ? text : utf8(text);
      }
      return op(encoding(o) ? 'readText' : 'read', 'open')(p);
    },
    writeFileSync: (p, data) => { op('write', 'open')(p, typeof data === 'string' ? data : new Uint8Array(data.buffer || data)); },
    appendFileSync: (p, data) => { op('append', 'open')(p, typeof data === 'string' ? data : new Uint8Array(data.buffer || data)); },
    existsSync: (p) => native.fs('exists', resolve(p)),
    readdirSync: (p) => op('readdir', 'scandir')(p),
    mkdirSync: (p, o) => { op(o && o.recursive ? 'mkdirp' : 'mkdir', 'mkdir')(p); },
    unlinkSync: (p) => { op('unlink', 'unlink')(p); },
    rmSync: (p, o) => { op(o && o.recursive ? 'rmrf' : 'unlink', 'rm')(p); },
    rmdirSync: (p) => { op('rmdir', 'rmdir')(p); },
    renameSync: (a, b) => { op('rename', 'rename')(a, resolve(b)); },
    statSync: (p) => statOf(op('stat', 'stat')(p)),
  };
  const promised = (f) => (...a) => new Promise((ok, fail) => { try { ok(f(...a)); } catch (e) { fail(e); } });
  fs.promises = {
    readFile: promised(fs.readFileSync), writeFile: promised(fs.writeFileSync),
    appendFile: promised(fs.appendFileSync), readdir: promised(fs.readdirSync),
    mkdir: promised(fs.mkdirSync), unlink: promised(fs.unlinkSync), rm: promised(fs.rmSync),
    stat: promised(fs.statSync), rename: promised(fs.renameSync),
  };
  const path = {
    sep: '/', delimiter: ':',
    join: (...p) => { const j = p.filter((x) => x !== '').join('/'); return j ? path.normalize(j) : '.'; },
    resolve: (...p) => resolve(p.reduce((acc, x) => (String(x).startsWith('/') ? x : acc + '/' + x), cwd)),
    normalize: (p) => { const abs = p.startsWith('/'); const r = resolve(abs ? p : '/' + p); return abs ? r : r.slice(1) || '.'; },
    basename: (p, ext) => { let b = p.replace(/\/+$/, '').split('/').pop(); if (ext && b.endsWith(ext)) b = b.slice(0, -ext.length); return b; },
    dirname: (p) => { const d = p.replace(/\/+$/, '').split('/').slice(0, -1).join('/'); return d || (p.startsWith('/') ? '/' : '.'); },
    extname: (p) => { const b = path.basename(p); const i = b.lastIndexOf('.'); return i > 0 ? b.slice(i) : ''; },
    isAbsolute: (p) => p.startsWith('/'),
  };
  const util = { inspect, format: (...a) => format(a) };

  // ---- leaving the sandbox: every call is a frame through the host door, which checks it
  // against the session's network policy and tools (see the manager's `egress` module).
  class NetworkRefused extends Error { get name() { return 'NetworkRefused'; } }
  class ToolError extends Error { get name() { return 'ToolError'; } }
  const raised = { refused: NetworkRefused, too_large: NetworkRefused, tool: ToolError };
  function ask(frame) {
    const answer = JSON.parse(native.call(JSON.stringify(frame)) || 'null');
    const error = answer && typeof answer === 'object' ? answer.error : null;
    if (error && typeof error === 'object' && error.kind) {
      const Kind = raised[error.kind] || Error;
      const e = new Kind(error.message);
      e.code = error.kind;
      throw e;
    }
    return answer;
  }
  const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
  function toBase64(bytes) {
    let out = '';
    for (let i = 0; i < bytes.length; i += 3) {
      const n = (bytes[i] << 16) | ((bytes[i + 1] || 0) << 8) | (bytes[i + 2] || 0);
      out += B64[(n >> 18) & 63] + B64[(n >> 12) & 63]
        + (i + 1 < bytes.length ? B64[(n >> 6) & 63] : '=') + (i + 2 < bytes.length ? B64[n & 63] : '=');
    }
    return out;
  }
  function fromBase64(text) {
    const clean = text.replace(/[^A-Za-z0-9+/]/g, '');
    const out = new Uint8Array(Math.floor(clean.length * 3 / 4));
    let j = 0;
    for (let i = 0; i < clean.length; i += 4) {
      const n = (B64.indexOf(clean[i]) << 18) | (B64.indexOf(clean[i + 1]) << 12)
        | ((B64.indexOf(clean[i + 2]) & 63) << 6) | (B64.indexOf(clean[i + 3]) & 63);
      if (j < out.length) out[j++] = (n >> 16) & 255;
      if (j < out.length) out[j++] = (n >> 8) & 255;
      if (j < out.length) out[j++] = n & 255;
    }
    return out;
  }
  const utf8 = (s) => new Uint8Array([...unescape(encodeURIComponent(s))].map((c) => c.charCodeAt(0)));
  const fromUtf8 = (b) => { let s = ''; for (const x of b) s += String.fromCharCode(x); try { return decodeURIComponent(escape(s)); } catch (_) { return s; } };
  function request(method, url, headers = [], body = null) {
    const bytes = body === null || body === undefined ? null : typeof body === 'string' ? utf8(body) : new Uint8Array(body.buffer || body);
    const a = ask({ call: 'http', method, url: String(url), headers: headers.map(([k, v]) => [String(k), String(v)]), body: bytes ? toBase64(bytes) : null, timeout: null });
    return { status: a.status, reason: a.reason, headers: a.headers, body: fromBase64(a.body), url: a.url };
  }
  class Headers {
    constructor(pairs = []) { this._pairs = Array.isArray(pairs) ? pairs.map(([k, v]) => [String(k).toLowerCase(), String(v)]) : Object.entries(pairs).map(([k, v]) => [k.toLowerCase(), String(v)]); }
    get(name) { const hit = this._pairs.filter(([k]) => k === String(name).toLowerCase()).map(([, v]) => v); return hit.length ? hit.join(', ') : null; }
    has(name) { return this.get(name) !== null; }
    entries() { return this._pairs[Symbol.iterator](); }
    [Symbol.iterator]() { return this.entries(); }
  }
  class Response {
    constructor(a) { this.status = a.status; this.statusText = a.reason; this.ok = a.status >= 200 && a.status < 300; this.url = a.url; this.headers = new Headers(a.headers); this._body = a.body; }
    async arrayBuffer() { return this._body.buffer; }
    async bytes() { return this._body; }
    async text() { return fromUtf8(this._body); }
    async json() { return JSON.parse(fromUtf8(this._body)); }
  }
  // `fetch` as the platform has it, answered by the host: no streaming bodies, no redirects
  // followed (a 3xx comes back as it is).
  async function fetch(url, init = {}) {
    const headers = init.headers instanceof Headers ? [...init.headers] : Array.isArray(init.headers) ? init.headers : Object.entries(init.headers || {});
    return new Response(request((init.method || 'GET').toUpperCase(), url, headers, init.body ?? null));
  }
  class TextEncoder {
    get encoding() { return 'utf-8'; }
    encode(text = '') { return utf8(String(text)); }
  }
  class TextDecoder {
    get encoding() { return 'utf-8'; }
    decode(bytes) { return bytes === undefined ? '' : fromUtf8(new Uint8Array(bytes.buffer || bytes)); }
  }
  const latin1 = (s) => { for (let i = 0; i < s.length; i++) if (s.charCodeAt(i) > 255) throw new Error('InvalidCharacterError: btoa takes Latin-1 text only'); return s; };
  define(G, 'TextEncoder', TextEncoder);
  define(G, 'TextDecoder', TextDecoder);
  define(G, 'btoa', (s) => toBase64([...latin1(String(s))].map((c) => c.charCodeAt(0))));
  define(G, 'atob', (s) => String.fromCharCode(...fromBase64(String(s))));
  define(G, 'fetch', fetch);
  define(G, 'Headers', Headers);
  define(G, 'Response', Response);
  const tools = new Proxy({}, {
    get: (_, name) => (typeof name !== 'string' ? undefined
      : (...args) => ask({ call: 'tool', name, args, kwargs: {} }).value),
  });
  define(G, 'llm_query', (...args) => tools.llm_query(...args));
  const arl = { request, tools, NetworkRefused, ToolError };
  const modules = { fs, 'fs/promises': fs.promises, path, util, process, arl };
  define(G, 'require', (name) => {
    const m = modules[String(name).replace(/^node:/, '')];
    if (m === undefined) {
      const e = new Error(`Cannot find module '${name}' (this sandbox offers ${Object.keys(modules).join(', ')})`);
      e.code = 'MODULE_NOT_FOUND';
      throw e;
    }
    return m;
  });
  define(G, 'global', G);

  // ---- the guest's hooks
  function describe(e) {
    if (e instanceof Error || (e && typeof e === 'object' && 'stack' in e && 'message' in e)) {
      const name = String(e.name || (e.constructor && e.constructor.name) || 'Error');
      const message = String(e.message === undefined ? '' : e.message);
      return [name, message, errorText(e).replace(/^\[|\]$/g, '')];
    }
    const text = inspect(e);
    return ['Uncaught', text, `Uncaught ${text}`];
  }
  return {
    inspect, describe, nextTimer, fireTimer, clearTimers,
    setEnv: (pairs) => { for (const k of Object.keys(env)) delete env[k]; for (const [k, v] of pairs) env[k] = v; },
    setCwd: (dir) => { cwd = dir; },
  };
})
