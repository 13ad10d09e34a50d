import { afterEach, describe, expect, it } from 'vitest';
import { createCollectingLogger } from '../../src/log.js';
import { GrpcCode, TtrpcStatusError } from '../../src/nri-plugin/errors.js';
import { TtrpcClient } from '../../src/nri-plugin/ttrpc-client.js';
import { decodeResponse, encodeRequest } from '../../src/nri-plugin/ttrpc-codec.js';
import { TtrpcDecoder, TtrpcMessageType, encodeTtrpcMessage } from '../../src/nri-plugin/ttrpc-framing.js';
import { TtrpcServer, type TtrpcMethodHandler } from '../../src/nri-plugin/ttrpc-server.js';

/** A client and a server wired back to back through in-memory transports (each send delivered async). */
function pair(methods: Record<string, TtrpcMethodHandler>) {
  const logger = createCollectingLogger();
  let server!: TtrpcServer;
  let client!: TtrpcClient;
  const toServer: Buffer[] = [];
  const toClient: Buffer[] = [];
  client = new TtrpcClient({ send: async (m) => void (toServer.push(Buffer.from(m)), setImmediate(() => server.receive(Buffer.from(m)))) }, { logger });
  server = new TtrpcServer(
    { send: async (m) => void (toClient.push(Buffer.from(m)), setImmediate(() => client.receive(Buffer.from(m)))) },
    { logger, services: new Map([['svc', new Map(Object.entries(methods))]]) },
  );
  return { client, server, logger, toServer, toClient };
}

const timers: NodeJS.Timeout[] = [];
afterEach(() => timers.splice(0).forEach(clearTimeout));

describe('ttrpc client and server', () => {
  it('uses odd, increasing stream ids from 1 and sends timeout_nano', async () => {
    const { client, toServer } = pair({ echo: (c) => c.payload });
    await client.call('svc', 'echo', Buffer.from('a'), { timeoutMs: 1500 });
    await client.call('svc', 'echo', Buffer.from('b'));
    const d = new TtrpcDecoder();
    const msgs = toServer.flatMap((b) => d.push(b));
    expect(msgs.map((m) => m.header.streamId)).toEqual([1, 3]);
    expect(msgs.map((m) => m.header.type)).toEqual([1, 1]);
  });

  it('answers requests concurrently, in completion order', async () => {
    const order: string[] = [];
    const { client } = pair({
      slow: () => new Promise((r) => timers.push(setTimeout(() => r(Buffer.from('slow')), 80))),
      fast: () => Buffer.from('fast'),
    });
    const a = client.call('svc', 'slow', Buffer.alloc(0)).then((b) => order.push(b.toString()));
    const b = client.call('svc', 'fast', Buffer.alloc(0)).then((b) => order.push(b.toString()));
    await Promise.all([a, b]);
    expect(order).toEqual(['fast', 'slow']);
  });

  it('maps handler errors: TtrpcStatusError keeps its code, anything else is Unknown (2) with the message', async () => {
    const { client } = pair({
      status: () => {
        throw new TtrpcStatusError(GrpcCode.NOT_FOUND, 'no such pod', { step: 't' });
      },
      boom: () => {
        throw new Error('boom');
      },
    });
    await expect(client.call('svc', 'status', Buffer.alloc(0))).rejects.toMatchObject({ code: 'TTRPC_STATUS', grpcCode: 5, grpcMessage: 'no such pod' });
    await expect(client.call('svc', 'boom', Buffer.alloc(0))).rejects.toMatchObject({ grpcCode: 2, grpcMessage: 'boom' });
  });

  it('a call past its timeoutMs rejects with TTRPC_DEADLINE_EXCEEDED; the late response is logged as inactive stream', async () => {
    const { client, logger } = pair({ slow: () => new Promise((r) => timers.push(setTimeout(() => r(Buffer.from('x')), 150))) });
    // The server honours timeout_nano and suppresses its late response; give the server no deadline by
    // calling with a locally shorter timeout through a raw request on the same client:
    await expect(client.call('svc', 'slow', Buffer.alloc(0), { timeoutMs: 30 })).rejects.toMatchObject({ code: 'TTRPC_DEADLINE_EXCEEDED' });
    expect(client.pendingCount).toBe(0);
    await new Promise((r) => setTimeout(r, 250));
    // the server overran timeout_nano (30 ms): it logged and did not answer, so nothing inactive arrived
    expect(logger.lines.some((l) => l.msg.includes('overran the request deadline'))).toBe(true);
    expect(logger.lines.some((l) => l.msg.includes('received message on inactive stream'))).toBe(false);
    // A response for a stream nobody waits for is logged:
    client.receive(encodeTtrpcMessage(99, TtrpcMessageType.RESPONSE, Buffer.alloc(0)));
    expect(logger.lines.some((l) => l.msg === 'ttrpc: received message on inactive stream' && l.fields['streamId'] === 99)).toBe(true);
  });

  it('an AbortSignal rejects the call with TTRPC_CANCELLED and removes its listener', async () => {
    const { client } = pair({ never: () => new Promise(() => undefined) });
    const ac = new AbortController();
    const p = client.call('svc', 'never', Buffer.alloc(0), { signal: ac.signal });
    ac.abort();
    await expect(p).rejects.toMatchObject({ code: 'TTRPC_CANCELLED' });
    await expect(client.call('svc', 'never', Buffer.alloc(0), { signal: ac.signal })).rejects.toMatchObject({ code: 'TTRPC_CANCELLED' });
  });

  it('close() rejects every pending call with TTRPC_CLOSED, and later calls at once', async () => {
    const { client } = pair({ never: () => new Promise(() => undefined) });
    const calls = [1, 2, 3].map(() => client.call('svc', 'never', Buffer.alloc(0)));
    await new Promise((r) => setImmediate(r));
    client.close();
    for (const c of calls) await expect(c).rejects.toMatchObject({ code: 'TTRPC_CLOSED' });
    await expect(client.call('svc', 'never', Buffer.alloc(0))).rejects.toMatchObject({ code: 'TTRPC_CLOSED' });
  });

  it('the server rejects even and reused stream ids (InvalidArgument), answers an undecodable request, and stays healthy', async () => {
    const logger = createCollectingLogger();
    const out: Buffer[] = [];
    const server = new TtrpcServer({ send: async (m) => void out.push(Buffer.from(m)) }, { logger, services: new Map([['svc', new Map([['m', () => Buffer.from('ok')]])]]) });
    const req = encodeRequest({ service: 'svc', method: 'm' });
    server.receive(encodeTtrpcMessage(2, TtrpcMessageType.REQUEST, req));
    server.receive(encodeTtrpcMessage(5, TtrpcMessageType.REQUEST, req));
    server.receive(encodeTtrpcMessage(3, TtrpcMessageType.REQUEST, req));
    server.receive(encodeTtrpcMessage(7, TtrpcMessageType.REQUEST, Buffer.from('0a7f61', 'hex')));
    server.receive(encodeTtrpcMessage(9, TtrpcMessageType.REQUEST, req));
    await new Promise((r) => setImmediate(r));
    const d = new TtrpcDecoder();
    const replies = out.flatMap((b) => d.push(b)).map((m) => (m.kind === 'message' ? [m.header.streamId, decodeResponse(m.data)] : []));
    expect(replies).toEqual([
      [2, { payload: Buffer.alloc(0), status: { code: 3, message: 'StreamID must be odd for client initiated streams' } }],
      [3, { payload: Buffer.alloc(0), status: { code: 3, message: 'StreamID cannot be re-used and must increment' } }],
      [7, expect.objectContaining({ status: expect.objectContaining({ code: 3, message: expect.stringContaining('unmarshal request error') }) })],
      [5, { payload: Buffer.from('ok') }],
      [9, { payload: Buffer.from('ok') }],
    ]);
    expect(logger.lines.some((l) => l.msg.includes('reuses a stream id'))).toBe(true);
  });

  it('answers an oversized request with ResourceExhausted (8) and keeps serving', async () => {
    const out: Buffer[] = [];
    const server = new TtrpcServer(
      { send: async (m) => void out.push(Buffer.from(m)) },
      { logger: createCollectingLogger(), maxDataBytes: 100, services: new Map([['svc', new Map([['m', () => Buffer.from('ok')]])]]) },
    );
    server.receive(Buffer.concat([encodeTtrpcMessage(1, TtrpcMessageType.REQUEST, Buffer.alloc(101), 0, 1000)]));
    server.receive(encodeTtrpcMessage(3, TtrpcMessageType.REQUEST, encodeRequest({ service: 'svc', method: 'm' })));
    await new Promise((r) => setImmediate(r));
    const d = new TtrpcDecoder();
    const replies = out.flatMap((b) => d.push(b)).map((m) => (m.kind === 'message' ? decodeResponse(m.data) : undefined));
    expect(replies[0]?.status).toEqual({ code: 8, message: 'message length 101 exceed maximum message size of 100' });
    expect(replies[1]).toEqual({ payload: Buffer.from('ok') });
  });
  it('reports each served request with its method, status code and service time', async () => {
    const served: Array<{ service: string; method: string; durationMs: number; code: number }> = [];
    const server = new TtrpcServer(
      { send: async () => undefined },
      {
        logger: createCollectingLogger(),
        onServed: (s) => served.push(s),
        services: new Map([['svc', new Map<string, TtrpcMethodHandler>([
          ['slow', () => new Promise((r) => setTimeout(() => r(Buffer.from('ok')), 20))],
          ['bad', () => { throw new TtrpcStatusError(GrpcCode.NOT_FOUND, 'nope', { step: 't' }); }],
        ])]]),
      },
    );
    server.receive(encodeTtrpcMessage(1, TtrpcMessageType.REQUEST, encodeRequest({ service: 'svc', method: 'slow' })));
    server.receive(encodeTtrpcMessage(3, TtrpcMessageType.REQUEST, encodeRequest({ service: 'svc', method: 'bad' })));
    await new Promise((r) => setTimeout(r, 60));
    expect(served.map((s) => [s.method, s.code])).toEqual([['bad', GrpcCode.NOT_FOUND], ['slow', 0]]);
    expect(served[1]!.durationMs).toBeGreaterThanOrEqual(15);
  });
});
