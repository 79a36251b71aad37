#!/usr/bin/env python3
"""Import-layer check for a crate's `src/`: builds the graph of `crate::<module>` references
between top-level modules (code only, comments and doc comments stripped), prints it, and
exits 1 on any cycle. Edges inside one top-level module (its own files) are not counted; the
crate root (lib.rs) re-exports and is not a module of the graph.

Usage: .ci/layers.py crates/smax/src
"""
import os, re, sys

def strip_comments(s):
    s = re.sub(r'/\*.*?\*/', '', s, flags=re.S)
    return '\n'.join(l.split('//')[0] for l in s.split('\n'))

def top_module(root, path):
    rel = os.path.relpath(path, root)
    first = rel.split(os.sep)[0]
    return None if first in ('lib.rs', 'main.rs') else first[:-3] if first.endswith('.rs') else first

def main(root):
    mods = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith('.rs'):
                p = os.path.join(d, f)
                m = top_module(root, p)
                if m:
                    mods.setdefault(m, []).append(p)
    edges = {m: set() for m in mods}
    for m, files in mods.items():
        for p in files:
            code = strip_comments(open(p).read())
            for g in re.finditer(r'\bcrate::(?:\{)?\s*([a-z_][a-z0-9_]*)', code):
                t = g.group(1)
                if t in mods and t != m:
                    edges[m].add(t)
            for g in re.finditer(r'use crate::\{([^}]*)\}', code):
                for t in re.findall(r'\b([a-z_][a-z0-9_]*)\b', g.group(1)):
                    if t in mods and t != m:
                        edges[m].add(t)
    for m in sorted(edges):
        print(f'{m:10} -> {", ".join(sorted(edges[m])) or "-"}')
    # Tarjan's strongly connected components.
    index, low, stack, on, sccs, n = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            c = []
            while True:
                w = stack.pop(); on.discard(w); c.append(w)
                if w == v: break
            if len(c) > 1: sccs.append(sorted(c))
    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index: visit(v)
    if sccs:
        for c in sccs: print('cycle:', ' <-> '.join(c))
        return 1
    print('no import cycle between top-level modules')
    return 0

if __name__ == '__main__':
    sys.exit(main(sys.argv[1]))
