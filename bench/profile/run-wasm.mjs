// Runs a wasm32-wasip1 command under Node's WASI (V8, the engine Envoy runs the filter in). Imports that WASI does
// not provide (the proxy-wasm host functions the library links but the driver never calls) are stubs that trap.
import { WASI } from 'node:wasi';
import { readFile } from 'node:fs/promises';

const [, , wasmPath, ...args] = process.argv;
const wasi = new WASI({ version: 'preview1', args: [wasmPath, ...args], env: {}, returnOnExit: true });
const module = await WebAssembly.compile(await readFile(wasmPath));
const imports = wasi.getImportObject();
for (const imp of WebAssembly.Module.imports(module)) {
  imports[imp.module] ??= {};
  if (imp.kind === 'function' && !(imp.name in imports[imp.module])) {
    imports[imp.module][imp.name] = () => { throw new Error(`host function ${imp.module}.${imp.name} called`); };
  }
}
const instance = await WebAssembly.instantiate(module, imports);
// The library's proxy_wasm::main! exports _initialize too, which WASI.start refuses next to _start.
const { memory, _start } = instance.exports;
process.exitCode = wasi.start({ exports: { memory, _start } });
