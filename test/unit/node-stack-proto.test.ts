import { existsSync, readFileSync } from 'node:fs';
import protobuf from 'protobufjs';
import { describe, expect, it } from 'vitest';
import { stripGogoproto } from '../../src/node-stack/cri-proto.js';
import { stackPaths } from '../../src/node-stack/paths.js';

const SAMPLE = `syntax = "proto3";

package runtime.v1;
option go_package = "k8s.io/cri-api/pkg/apis/runtime/v1";

import "github.com/gogo/protobuf/gogoproto/gogo.proto";

option (gogoproto.goproto_stringer_all) = false;
option (gogoproto.marshaler_all) =  true;

message A {
    int64 x = 1 [(gogoproto.nullable) = false];
    string y = 2 [deprecated = true, (gogoproto.customname) = "Y"];
    repeated string z = 3; // [not an option]
}
`;

describe('stripGogoproto', () => {
  it('drops the gogo import, file options and field options, and keeps the rest', () => {
    const out = stripGogoproto(SAMPLE);
    expect(out).not.toContain('gogo');
    expect(out).toContain('option go_package = "k8s.io/cri-api/pkg/apis/runtime/v1";');
    expect(out).toContain('    int64 x = 1;');
    expect(out).toContain('    string y = 2 [deprecated = true];');
    expect(out).toContain('    repeated string z = 3; // [not an option]');
  });

  it('gives a proto protobufjs parses with the same field numbers', () => {
    const root = protobuf.parse(stripGogoproto(SAMPLE)).root;
    const A = root.lookupType('runtime.v1.A');
    expect(A.fields.x?.id).toBe(1);
    expect(A.fields.y?.id).toBe(2);
    expect(A.fields.z?.repeated).toBe(true);
  });

  it('is idempotent', () => {
    expect(stripGogoproto(stripGogoproto(SAMPLE))).toBe(stripGogoproto(SAMPLE));
  });

  // Debian's real file, when the stack is provisioned (scripts/setup.sh makes it so).
  const real = stackPaths('1.7').criProto;
  it.runIf(existsSync(real))('strips Debian\'s CRI api.proto into one protobufjs can load', () => {
    const root = protobuf.parse(stripGogoproto(readFileSync(real, 'utf8'))).root;
    expect(root.lookupService('runtime.v1.RuntimeService').methods.RunPodSandbox).toBeDefined();
    expect(root.lookupService('runtime.v1.ImageService').methods.ListImages).toBeDefined();
    expect(root.lookupEnum('runtime.v1.NamespaceMode').values.CONTAINER).toBe(1);
  });
});
