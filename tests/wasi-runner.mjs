// Cargo's runner for wasm32-wasip1 test binaries: runs the core's unit tests inside a wasm engine
// (V8, through Node's WASI preview1), the same engine family Envoy runs the filter in.
import { WASI } from 'node:wasi';
import { readFile } from 'node:fs/promises';

const [, , wasmPath, ...args] = process.argv;
const wasi = new WASI({ version: 'preview1', args: [wasmPath, ...args], env: process.env, returnOnExit: true });
const module = await WebAssembly.compile(await readFile(wasmPath));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
process.exitCode = wasi.start(instance);
